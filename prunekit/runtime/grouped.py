"""Padded encoders whose language-model tokens are groups of patches made after the encoder (InternVL: the pixel
shuffle turns every 2x2 block of a tile's patch grid into one token; LLaVA-OneVision: the 2x2 bilinear pooling of a
video frame's grid, whose windows overlap by a row or a column where the side is odd).

Inside such an encoder a cut keeps or drops whole groups, so every token the model makes afterwards is either
whole or gone. Strategies see a group as the mean of its patch states (the attention it receives: the sum over its
patches; keys and values: the mean). Groups are named by their original id (raster order of the token grid). Until
the first cut the rows are the model's own patch order; a cut lays each unit's surviving groups out group-major
(a group's patches consecutive, groups in id order; a patch two kept groups share is one row, where it first
appears). After the encoder's last layer ``restore`` puts every surviving patch back at its place in the full grid
(zeros elsewhere), because the model reshapes the full grid before it groups; the dropped groups' tokens are removed
again before the projector (InternVL) or at the language model's entry (OneVision).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GroupedRows:
    groups: Tensor  # (G, g): the patches (positions after the prefix, raster order) of each group
    patches: int = 0  # patches in a unit's full grid (0: G * g, groups that tile the grid)
    live: list[Tensor] | None = None  # per unit: the group ids its rows hold, ascending (None: the model's order)
    rows: list[Tensor] | None = None  # per unit: the patch each of its rows holds (with ``live``)

    def __post_init__(self):
        self.patches = self.patches or self.groups.numel()

    @property
    def size(self) -> int:
        return self.groups.shape[1]

    def columns(self, ids: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(U, N, g) positions (after the prefix) in the current rows of each unit's groups ``ids``, and validity."""
        n = max((len(i) for i in ids), default=0)
        cols = torch.zeros(len(ids), n, self.size, dtype=torch.long)
        for u, i in enumerate(ids):
            i = i.cpu()
            if self.live is None:
                cols[u, : len(i)] = self.groups[i]
            else:
                row = self._row_of(u)[self.groups[i]]
                if bool((row < 0).any()):
                    raise ValueError(f"unit {u} asks for groups its encoder rows no longer hold")
                cols[u, : len(i)] = row
        return cols, torch.arange(n)[None] < torch.tensor([len(i) for i in ids])[:, None]

    def _row_of(self, u: int) -> Tensor:
        """(patches,) the row of unit ``u`` holding each patch, -1 where none does."""
        row = torch.full((self.patches,), -1, dtype=torch.long)
        row[self.rows[u]] = torch.arange(len(self.rows[u]))
        return row

    def tokens(self, patches: Tensor, cols: Tensor, valid: Tensor) -> Tensor:
        """(U, N, D) the mean patch state of the groups at ``columns(ids)`` (zero past a unit's count)."""
        index = cols.reshape(len(cols), -1).to(patches.device)
        gathered = patches.gather(1, index[..., None].expand(-1, -1, patches.shape[-1]))
        means = gathered.view(len(cols), -1, self.size, patches.shape[-1]).mean(2)
        return means * valid.to(patches.device)[..., None].to(means.dtype)

    def keep(self, patches: Tensor, ids: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Each unit's groups ``ids`` (ascending) laid out group-major, a shared patch once: (U, R_max, D) zero
        right-padded, and (U,) rows per unit. They become the rows' groups."""
        cols, _ = self.columns(ids)
        rows, sources = [], []
        for u, i in enumerate(ids):
            members = self.groups[i.cpu()].reshape(-1)
            first = _first_occurrences(members)
            rows.append(members[first])
            sources.append(cols[u, : len(i)].reshape(-1)[first])
        counts = torch.tensor([len(r) for r in rows])
        out = patches.new_zeros(len(ids), int(counts.max()) if len(counts) else 0, patches.shape[-1])
        for u, source in enumerate(sources):
            out[u, : len(source)] = patches[u, source.to(patches.device)]
        self.live, self.rows = [i.cpu().clone() for i in ids], rows
        return out, counts

    def restore(self, patches: Tensor) -> Tensor:
        """(U, patches, D): the rows' patches back at their places in each unit's full grid, zeros where groups
        were dropped."""
        out = patches.new_zeros(patches.shape[0], self.patches, patches.shape[-1])
        for u, places in enumerate(self.rows):
            out[u, places.to(patches.device)] = patches[u, : len(places)]
        return out


def _first_occurrences(values: Tensor) -> Tensor:
    """Ascending positions of each value's first occurrence in ``values`` (all of them where values are distinct)."""
    unique, inverse = torch.unique(values, return_inverse=True)
    first = torch.full((len(unique),), len(values), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(len(values)), reduce="amin")
    return first.sort().values

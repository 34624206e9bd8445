"""Padded encoders whose language-model tokens are groups of patches made after the encoder (InternVL: the pixel
shuffle turns every 2x2 block of a tile's patch grid into one token).

Inside such an encoder a cut keeps or drops whole groups, so every token the model makes afterwards is either
whole or gone. Strategies see a group as the mean of its patch states (the attention it receives: the sum over its
patches; keys and values: the mean). Groups are named by their original id (raster order of the token grid). Until
the first cut the rows are the model's own patch order; a cut lays each unit's surviving groups out group-major
(a group's patches consecutive, groups in id order). After the encoder's last layer ``restore`` puts every surviving
patch back at its place in the full grid (zeros elsewhere), because the model reshapes the full grid before it
groups; the dropped groups' tokens are removed again before the projector.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GroupedRows:
    groups: Tensor  # (G, g): the patches (positions after the prefix, raster order) of each group
    live: list[Tensor] | None = None  # per unit: the group ids its rows hold, group-major (None: the model's order)

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
                slot = torch.searchsorted(self.live[u], i)  # both ascending
                if len(i) and not torch.equal(self.live[u][slot.clamp(max=len(self.live[u]) - 1)], i):
                    raise ValueError(f"unit {u} asks for groups its encoder rows no longer hold")
                cols[u, : len(i)] = slot[:, None] * self.size + torch.arange(self.size)
        return cols, torch.arange(n)[None] < torch.tensor([len(i) for i in ids])[:, None]

    def tokens(self, patches: Tensor, cols: Tensor, valid: Tensor) -> Tensor:
        """(U, N, D) the mean patch state of the groups at ``columns(ids)`` (zero past a unit's count)."""
        index = cols.reshape(len(cols), -1).to(patches.device)
        gathered = patches.gather(1, index[..., None].expand(-1, -1, patches.shape[-1]))
        means = gathered.view(len(cols), -1, self.size, patches.shape[-1]).mean(2)
        return means * valid.to(patches.device)[..., None].to(means.dtype)

    def keep(self, patches: Tensor, ids: list[Tensor]) -> Tensor:
        """(U, K_max * g, D): each unit's groups ``ids`` (ascending) laid out group-major, zero right-padded; they
        become the rows' groups."""
        cols, _ = self.columns(ids)
        out = patches.new_zeros(len(ids), cols.shape[1] * self.size, patches.shape[-1])
        for u, i in enumerate(ids):
            rows = cols[u, : len(i)].reshape(-1).to(patches.device)
            out[u, : len(rows)] = patches[u, rows]
        self.live = [i.cpu().clone() for i in ids]
        return out

    def restore(self, patches: Tensor) -> Tensor:
        """(U, G * g, D): the rows' patches back at their places in each unit's full grid, zeros where groups
        were dropped."""
        out = patches.new_zeros(patches.shape[0], self.groups.numel(), patches.shape[-1])
        for u, ids in enumerate(self.live):
            places = self.groups[ids].reshape(-1).to(patches.device)
            out[u, places] = patches[u, : len(places)]
        return out

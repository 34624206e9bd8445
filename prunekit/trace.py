"""PruneTrace: what happened to the visual tokens in the last prefill.

Every visual token that reaches the language model has one representative index into its sample's
unpruned visual-token span (all image tokens of the sample in prompt order, 0..N-1; raster order for a
LLaVA-1.5 image). Merged tokens also list their members. Stage events give tokens in/out per sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .budget import Budget, layer_average, layer_average_out


@dataclass
class StageEvent:
    site: str  # e.g. "vision_output" or "llm_layer[2]"
    n_in: list[int]  # per sample: tokens the site decided on (vision sites: over the sample's units, e.g. crops)
    n_out: list[int]  # per sample: tokens it kept (same units)
    kept: list[Tensor] | None = None  # per sample: span indices (representatives) alive after the site


@dataclass
class SampleTrack:
    """Per sample: the visual tokens currently alive, as indices into the unpruned span."""

    span_length: int  # N: unpruned visual tokens of the sample
    image_of: Tensor  # (N,) which image of the sample each span index belongs to
    kept: Tensor  # (n,) representative span index of each live token, in sequence order (ascending unless reordered)
    members: list[Tensor]  # per live token: its member span indices
    grids: list[tuple[int, int] | None] | None = None  # per image: its raster grid, when known (else from grid_of)

    @classmethod
    def full(cls, image_lengths: list[int], grids: list | None = None) -> "SampleTrack":
        n = sum(image_lengths)
        image_of = torch.repeat_interleave(torch.arange(len(image_lengths)), torch.tensor(image_lengths, dtype=torch.long))
        kept = torch.arange(n)
        return cls(n, image_of, kept, list(kept.view(n, 1).unbind(0)), grids)

    @classmethod
    def from_images(cls, images: list["SampleTrack"]) -> "SampleTrack":
        """A sample's track from its images' tracks, offset into the sample's span."""
        track = cls.full([d.span_length for d in images], [d.grid for d in images])
        offset, kept, members = 0, [], []
        for d in images:
            kept.append(offset + d.kept)
            members += [offset + m for m in d.members]
            offset += d.span_length
        if images:
            track.kept, track.members = torch.cat(kept), members
        return track

    @property
    def grid(self) -> tuple[int, int] | None:
        """The raster grid of a one-image track, if known."""
        return self.grids[0] if self.grids and len(self.grids) == 1 else None

    @property
    def intact_single_image(self) -> bool:
        """One image whose tokens are all still there (so they form its full grid)."""
        images = len(self.grids) if self.grids is not None else int(self.image_of.max()) + 1
        return self.span_length > 0 and len(self.kept) == self.span_length and images == 1

    def grid_positions(self, grid_of) -> Tensor:
        """(n, 3): image, row, col of each live token's representative; row/col -1 without a grid.

        Grids come from ``grids`` when known, else ``grid_of(n_tokens)`` gives the (rows, cols) grid of an
        intact image of that many tokens.
        """
        image = self.image_of[self.kept]
        lengths = torch.bincount(self.image_of)
        starts = torch.cumsum(lengths, 0) - lengths
        local = self.kept - starts[image]
        row, col = torch.full_like(local, -1), torch.full_like(local, -1)
        for i, n in enumerate(lengths.tolist()):
            grid = self.grids[i] if self.grids is not None else grid_of(n) if n else None
            if grid is not None:
                sel = image == i
                row[sel], col[sel] = local[sel] // grid[1], local[sel] % grid[1]
        return torch.stack([image, row, col], 1)

    def select(self, indices: Tensor, members: list[Tensor] | None = None) -> None:
        """Apply a decision given as indices into the live tokens (and members, also into live tokens)."""
        indices = indices.cpu()
        if members is None:
            new_members = [self.members[i] for i in indices.tolist()]
        else:
            new_members = [self._merged([self.members[j] for j in m.cpu().tolist()]) for m in members]
        self.kept = self.kept[indices]
        self.members = new_members

    @staticmethod
    def _merged(parts: list[Tensor]) -> Tensor:
        """The sorted union of members (each list sorted); none: a token standing for no patch (VisionZip's CLS)."""
        if len(parts) == 1:
            return parts[0]  # already sorted: most tokens of a merging decision stand for themselves
        return torch.cat(parts).sort().values if parts else torch.zeros(0, dtype=torch.long)


@dataclass
class PruneTrace:
    strategy: str
    batch_size: int
    num_llm_layers: int
    budget: Budget | None = None
    position_policy: str = "compact"
    events: list[StageEvent] = field(default_factory=list)
    samples: list[SampleTrack] = field(default_factory=list)
    # visual tokens taken as input by each language-model layer, per sample: (B, L) long
    llm_layer_counts: Tensor | None = None
    # patch tokens entering each vision-encoder layer, per sample (all its images): (B, encoder layers)
    vision_layer_counts: Tensor | None = None
    # per sample: vision units through the encoder (images; LLaVA-NeXT: crops) and their unpruned tokens at the
    # projector's input granularity (Qwen: merge groups of merge_size patches)
    vision_units: list[int] | None = None
    vision_tokens: list[int] | None = None
    unit_tokens: list[list[int]] | None = None  # per sample: each of its vision units' tokens (LM granularity), unpruned
    unit_patches: list[list[int]] | None = None  # per sample: each of its vision units' encoder patches, unpruned
    projector_tokens: list[int] | None = None  # per sample: tokens the projector mapped (after vision-side cuts)
    merge_size: int = 1
    notes: list[str] = field(default_factory=list)
    replayed: bool = False

    # --- per sample -------------------------------------------------------------------------------
    def kept_positions(self, sample: int) -> Tensor:
        """Representative span indices (0..N-1) of the visual tokens reaching the last LLM layer."""
        return self.samples[sample].kept.clone()

    def members(self, sample: int) -> list[Tensor]:
        """For each kept visual token, the span indices it stands for (itself unless merged)."""
        return [m.clone() for m in self.samples[sample].members]

    def images(self, sample: int) -> Tensor:
        """For each kept visual token, which image of the sample it comes from."""
        s = self.samples[sample]
        return s.image_of[s.kept]

    def kept_after(self, site: str, sample: int) -> Tensor:
        """Representative span indices alive after ``site`` (e.g. ``"vision_layer[3]"``): per-layer overlays."""
        for ev in self.events:
            if ev.site == site and ev.kept is not None:
                return ev.kept[sample].clone()
        raise KeyError(f"no pruning event at {site!r}; events: {[ev.site for ev in self.events]}")

    def has_images(self, sample: int) -> bool:
        return self.samples[sample].span_length > 0

    # --- accounting (per sample lists) ------------------------------------------------------------
    @property
    def n_vanilla(self) -> list[int]:
        return [s.span_length for s in self.samples]

    @property
    def n_in(self) -> list[int]:
        return self._column(0)

    @property
    def n_final(self) -> list[int]:
        return [len(s.kept) for s in self.samples]

    @property
    def n_avg(self) -> list[float]:
        if self.llm_layer_counts is None:
            return [0.0] * self.batch_size
        return [layer_average(row.tolist()) for row in self.llm_layer_counts]

    @property
    def n_avg_out(self) -> list[float]:
        """n_avg with each layer counted by the visual tokens it outputs (a layer followed by a cut counts the
        survivors): SparseVLM's runtime logger ("equal tokens"), Gumpest/SparseVLMs#24."""
        if self.llm_layer_counts is None:
            return [0.0] * self.batch_size
        return [layer_average_out(row.tolist()) for row in self.llm_layer_counts]

    def _column(self, layer: int) -> list[int]:
        if self.llm_layer_counts is None:
            return [0] * self.batch_size
        return self.llm_layer_counts[:, layer].tolist()

    def summary(self) -> dict:
        """Batch means of the three conventions plus what the budget constrained."""
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        out = {
            "strategy": self.strategy,
            "batch_size": self.batch_size,
            "n_vanilla": mean(self.n_vanilla),
            "n_in": mean(self.n_in),
            "n_final": mean(self.n_final),
            "n_avg": mean(self.n_avg),
            "n_avg_out": mean(self.n_avg_out),
            "position_policy": self.position_policy,
        }
        if self.budget is not None:
            out.update(budget=self.budget.tokens, budget_convention=self.budget.convention)
        return out

    def __str__(self) -> str:
        lines = [f"PruneTrace({self.strategy}, batch={self.batch_size}, positions={self.position_policy})"]
        if self.budget is not None:
            lines.append(f"  budget: {self.budget.tokens} visual tokens ({self.budget.convention})")
        for ev in self.events:
            lines.append(f"  {ev.site:<22} in {ev.n_in} -> out {ev.n_out}")
        if self.vision_layer_counts is not None and self.events and self.events[0].site.startswith("vision_layer"):
            lines.append(f"  encoder layer inputs (sample 0): {self.vision_layer_counts[0].tolist()}")
        lines.append(f"  n_vanilla={self.n_vanilla} n_in={self.n_in} n_final={self.n_final} "
                     f"n_avg={[round(x, 2) for x in self.n_avg]} n_avg_out={[round(x, 2) for x in self.n_avg_out]}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

"""Packed vision encoders (Qwen2-VL / Qwen2.5-VL): all images as one flat sequence delimited by ``cu_seqlens``.

The runtime prunes such an encoder at the granularity of the language model's visual tokens: merge groups
of ``merge_size`` consecutive encoder rows (the 2x2 PatchMerger's input), kept or dropped whole, so every
merged token still covers one 2x2 window. ``PackedState`` follows which original encoder rows are still in
the flat sequence and rebuilds what the blocks take for it: ``cu_seqlens`` per image, ``cu_window_seqlens``
per attention window (Qwen2.5-VL), the sliced rotary tables, ``max_seqlen`` where the backend wants one.
A group is presented to strategies as the mean of its rows (tokens, keys, values) and the attention it
receives as the sum over its rows; groups are listed in raster order of the image's group grid, whatever
the encoder's own order (Qwen2.5-VL's window order).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..adapters.qwen2_vl import PackedImages
from ..errors import PruningError


@dataclass
class GroupView:
    """The live merge groups of each image, in raster order, over a flat (rows, D) sequence."""

    first: list[Tensor]  # per image: flat position of each live group's first row (raster order of groups)
    groups: list[Tensor]  # per image: local group id of each live group (ascending)
    starts: list[int]  # per image: flat position of its first live row (its rows are contiguous)
    size: int  # rows per group

    def tokens(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(U, G, D) group means (zero-padded) and (U,) live group counts."""
        lengths = torch.tensor([len(f) for f in self.first])
        means = []
        for u, first in enumerate(self.first):
            if self._raster_runs[u] and hidden.is_contiguous():  # Qwen2-VL: groups lie in raster order
                rows = hidden[self.starts[u] : self.starts[u] + len(first) * self.size].view(len(first), self.size, -1)
            else:  # Qwen2.5-VL's window order: gather (the same layout, so the same bits)
                rows = hidden[first.to(hidden.device)[:, None] + torch.arange(self.size, device=hidden.device)]
            means.append(rows.mean(1))
        if len(means) == 1:
            return means[0][None], lengths
        out = hidden.new_zeros(len(self.first), int(lengths.max()) if len(lengths) else 0, hidden.shape[-1])
        for u, mean in enumerate(means):
            out[u, : len(mean)] = mean
        return out, lengths

    @functools.cached_property
    def _raster_runs(self) -> list[bool]:
        """Per image: whether its live groups' rows lie in raster order, one group after the other (Qwen2-VL)."""
        return [len(first) == 0 or bool((first == start + self.size * torch.arange(len(first))).all())
                for first, start in zip(self.first, self.starts)]

    @functools.cached_property
    def columns(self) -> tuple[Tensor, Tensor]:
        """(U, G, size) positions of each group's rows inside its image's chunk, and (U, G) validity."""
        n = max((len(f) for f in self.first), default=0)
        cols = torch.zeros(len(self.first), n, self.size, dtype=torch.long)
        valid = torch.zeros(len(self.first), n, dtype=torch.bool)
        for u, first in enumerate(self.first):
            cols[u, : len(first)] = (first - self.starts[u])[:, None] + torch.arange(self.size)
            valid[u, : len(first)] = True
        return cols, valid


@dataclass
class PackedState:
    images: PackedImages
    size: int  # encoder rows per merge group
    rows: Tensor = field(init=False)  # original encoder rows still in the flat sequence, in its order
    image_of_row: Tensor = field(init=False)
    group_offsets: Tensor = field(init=False)
    block_kwargs: dict | None = None  # {"full": cu_seqlens, "window": cu_window_seqlens, "pos": (cos, sin)}
    _view: GroupView | None = field(default=None, init=False, repr=False)  # of the current rows (a cut resets it)
    _chunks: Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        patches = torch.tensor(self.images.patches)
        self.rows = torch.arange(int(patches.sum()))
        self.image_of_row = torch.repeat_interleave(torch.arange(len(patches)), patches)
        self.group_offsets = F.pad(torch.tensor(self.images.groups).cumsum(0), (1, 0))

    def pixels(self, pixel_values: Tensor, image: int) -> Tensor:
        start = sum(self.images.patches[:image])
        return pixel_values[start : start + self.images.patches[image]]

    def view(self) -> GroupView:
        """The live groups; computed once per live set (rows change only at a cut)."""
        if self._view is None:
            self._view = self._group_view()
        return self._view

    def _group_view(self) -> GroupView:
        image = self.image_of_row[self.rows]
        local = self.images.row_group[self.rows] - self.group_offsets[image]
        first, groups, starts = [], [], []
        for u in range(len(self.images.patches)):
            where = (image == u).nonzero().squeeze(1)
            heads = where[:: self.size]  # a group's rows are consecutive in the encoder's order
            order = torch.argsort(local[heads])
            first.append(heads[order])
            groups.append(local[heads][order])
            starts.append(int(where[0]) if len(where) else 0)
        return GroupView(first, groups, starts, self.size)

    def keep_groups(self, view: GroupView, kept: list[Tensor]) -> Tensor:
        """Keep, per image, the live groups at positions ``kept[u]`` (indices into ``view.groups[u]``); returns the
        (rows,) bool mask of surviving flat positions and updates ``rows``."""
        mask = torch.zeros(len(self.rows), dtype=torch.bool)
        for u, idx in enumerate(kept):
            first = view.first[u][idx.cpu()]
            mask[(first[:, None] + torch.arange(self.size)).reshape(-1)] = True
        self.rows = self.rows[mask]
        self._view = self._chunks = None
        return mask

    def rebuild(self, rotary: tuple[Tensor, Tensor], max_seqlen) -> None:
        """The blocks' kwargs for the current rows: the model's rotary tables (one row per original encoder row)
        at the surviving rows, and new sequence boundaries. Indexing the original tables by ``rows`` keeps a
        second cut right (its mask is over the rows the first cut left)."""
        device = rotary[0].device
        cos, sin = (t[self.rows.to(t.device)] for t in rotary)
        full = self.image_chunks()
        window = None
        if self.images.row_window is not None:
            _, counts = torch.unique_consecutive(self.images.row_window[self.rows], return_counts=True)
            window = _cumulative(counts)
        self.block_kwargs = {
            "full": full.to(device), "window": None if window is None else window.to(device), "pos": (cos, sin),
            "max_full": None if max_seqlen is None else _longest(full),
            "max_window": None if max_seqlen is None or window is None else _longest(window),
        }

    def call_for(self, windowed: bool) -> "BlockCall":
        kw = self.block_kwargs
        which = "window" if windowed and kw["window"] is not None else "full"
        return BlockCall(kw[which], kw["pos"], kw["max_" + which])

    def image_chunks(self) -> Tensor:
        """(images + 1,) boundaries of each image's rows in the current flat sequence."""
        if self._chunks is None:
            image = self.image_of_row[self.rows]
            self._chunks = _cumulative(torch.bincount(image, minlength=len(self.images.patches)))
        return self._chunks

    def scatter_groups(self, merged: Tensor) -> Tensor | None:
        """A merger's output over the current rows (one row per live group, encoder order) put into every group's slot
        of its unpruned output, zeros at dropped groups; None when no group is dropped."""
        total = int(self.group_offsets[-1])
        if merged.shape[0] == total:
            return None
        heads = self.rows[:: self.size]
        if merged.shape[0] != len(heads):
            raise PruningError(f"a merger returned {merged.shape[0]} rows for the {len(heads)} live merge groups")
        full = merged.new_zeros(total, merged.shape[-1])
        full[self.encoder_slot_of_group()[self.images.row_group[heads]].to(full.device)] = merged
        return full

    def encoder_slot_of_group(self) -> Tensor:
        """(groups,) where each group (global raster id) sits in the merger's unpruned output (window order on 2.5)."""
        return torch.argsort(self.images.row_group[:: self.size])


@dataclass
class BlockCall:
    """A packed encoder block's sequence boundaries, rotary tables and longest chunk (None: not passed)."""

    cu_seqlens: Tensor
    rotary: tuple[Tensor, Tensor]
    max_seqlen: int | None


def _cumulative(counts: Tensor) -> Tensor:
    return F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)


def _longest(cu: Tensor) -> int:
    return int((cu[1:] - cu[:-1]).max()) if len(cu) > 1 else 0


def lay_out_calls(calls: list[Tensor], bounds: Tensor) -> Tensor:
    """A packed encoder's attention calls (1, H, n_c, d), consecutive pieces of its flat sequence (one per image,
    per window, or one in all), as (images, H, n_max, d) zero-padded per image; one copy, contiguous."""
    lengths = (bounds[1:] - bounds[:-1]).tolist()
    if [c.shape[2] for c in calls] != lengths:  # windows, or one call for all: re-split by image
        calls = list(torch.cat(calls, dim=2).split(lengths, dim=2))
    if len(set(lengths)) <= 1:
        return torch.cat(calls, dim=0)
    head = calls[0]
    out = head.new_zeros(len(lengths), head.shape[1], max(lengths), head.shape[3])
    for u, call in enumerate(calls):
        out[u, :, : call.shape[2]] = call[0]
    return out


def live_rows(bounds: Tensor) -> Tensor | None:
    """(images, n_max) mask of each image's real rows in ``lay_out_calls``' layout; None when there is no padding."""
    lengths = bounds[1:] - bounds[:-1]
    if len(lengths) == 0 or bool((lengths == lengths[0]).all()):
        return None
    return torch.arange(int(lengths.max())) < lengths[:, None]

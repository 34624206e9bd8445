"""The language-model sequence after pruning: which slots survive, their masks and their positions.

A ``Segment`` describes the sequence that a run of decoder layers sees. Pruning a segment gathers the
kept slots (tokens are physically removed), re-pads ragged samples on the left with masked slots, and
gives kept tokens positions under the strategy's policy: ``original`` keeps the unpruned positions,
``compact`` renumbers as if the short sequence had been the prompt (each token moves down by the
number of tokens dropped before it). ``shift`` is how far decode positions lag the original ones.
``mask_out`` is the masking alternative to the gather (an ablation): the dropped slots stay in the
sequence as padding, so they are still computed but no later query attends to them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def pack(mask: Tensor, align: str) -> tuple[Tensor, Tensor]:
    """Gather indices that collect each row's True entries in order.

    Returns ``(index, valid)`` of shape (B, n) with n the largest row count. ``align="left"`` puts the
    entries first (right padding), ``"right"`` puts them last (left padding, as for prompts).
    Padding slots point at dropped entries and have ``valid`` False.
    """
    n = int(mask.sum(1).max()) if mask.numel() else 0
    key = (mask if align == "right" else ~mask).to(torch.int8)
    order = torch.sort(key, dim=1, stable=True).indices  # non-selected first (right) / selected first (left)
    index = order[:, mask.shape[1] - n :] if align == "right" else order[:, :n]
    return index, mask.gather(1, index)


def take(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b]]`` along dim 1 for x of shape (B or 1, L, ...)."""
    if x.shape[0] != index.shape[0]:
        x = x.expand(index.shape[0], *x.shape[1:])
    view = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, view)


@dataclass
class Segment:
    """The sequence seen by decoder layers ``start_layer`` and later (until the next pruning site)."""

    start_layer: int
    mask: Tensor  # (B, L) bool: live (non-padding) slots of the prefill part
    positions: Tensor  # (B, L, C) long: positions of the slots under the policy (C = 3 for M-RoPE, else 1)
    visual: Tensor  # (B, L) bool: slots holding live visual tokens
    shift: Tensor  # (B,) long: original position - this segment's position, for decode steps
    types: Tensor | None = None  # (B, L) TokenType codes of the slots (pad / system / image / text)
    rows: Tensor | None = None  # (B, L) long: each live visual slot's row of the injected features (DeepStack)
    # kwargs computed once per forward step and reused by every layer of the segment
    step: int = -1
    layer_call: Any = None  # compat.LayerCall

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def visual_counts(self) -> Tensor:
        return self.visual.sum(1)

    def select(self, keep: Tensor, policy: str, start_layer: int) -> tuple[Tensor, "Segment"]:
        """Keep the slots where ``keep`` (B, L) is True; returns the gather index and the new segment."""
        positions, shift = self._positions(self.mask & ~keep, policy)
        index, valid = pack(keep, align="right")
        new = Segment(
            start_layer=start_layer,
            mask=take(self.mask, index) & valid,
            positions=take(positions, index),
            visual=take(self.visual & keep, index) & valid,
            shift=shift,
            types=None if self.types is None else take(self.types, index) * valid,
        )
        return index, new

    def mask_out(self, keep: Tensor, policy: str, start_layer: int) -> "Segment":
        """Drop the slots where ``keep`` is False by masking: they stay in the sequence (and are still
        computed) but become padding, so no later query attends to them."""
        positions, shift = self._positions(self.mask & ~keep, policy)
        return Segment(start_layer=start_layer, mask=self.mask & keep, positions=positions,
                       visual=self.visual & keep, shift=shift,
                       types=None if self.types is None else self.types * keep)

    def _positions(self, dropped: Tensor, policy: str) -> tuple[Tensor, Tensor]:
        """Positions and decode shift after dropping ``dropped`` under ``policy``."""
        if policy == "compact":
            return self.positions - dropped.cumsum(1)[..., None], self.shift + dropped.sum(1)
        if policy != "original":
            raise ValueError(f"unknown position policy {policy!r}; use 'compact' or 'original'")
        return self.positions, self.shift

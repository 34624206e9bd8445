"""fastervlm: the image tokens [CLS] attends to most (FasterVLM, arXiv 2412.01818; docs/strategies/fastervlm.md).

Per image, at the vision feature layer (LLaVA: the output of layer −2, before the projector):

  1. score   s_j = head mean of softmax(q_CLS·Kᵀ/√d) of the feature layer, over all keys, at patch j
             (the [CLS] row only, from that layer's q and k: no output_attentions, no eager attention)
  2. keep    the top `budget` patches by s (ties: lower index), in original order; [CLS] is dropped as LLaVA does
"""
from __future__ import annotations

import torch

from prunekit.pruner import Keep, PruneContext, Site, Stage, TokenPruner
from prunekit.registry import register_strategy
from prunekit.signals import AttentionRows, Signals

from ._placement import needs_cls
from prunekit.ops import select_top


@register_strategy("fastervlm")
class FasterVLM(TokenPruner):
    def __init__(self, budget: int = 58, positions: str = "compact"):  # README: 144 (75%), 58 (90%), 29 (95%)
        super().__init__(budget, "n_in")
        self.position_policy = positions

    def sites(self):
        return [Site(Stage.VISION_OUTPUT)]

    def signals(self, site: Site):
        return Signals(rows=(AttentionRows("first"),))  # the CLS row, head mean

    def supports(self, adapter) -> str | None:
        return needs_cls(adapter, "FasterVLM")

    def prune(self, ctx: PruneContext) -> Keep:
        scores = ctx.attention("first").float()
        live = torch.arange(scores.shape[1], device=scores.device)[None] < ctx.lengths.to(scores.device)[:, None]
        return Keep(select_top(scores, live, torch.tensor([ctx.target(u) for u in range(ctx.num_units)])))

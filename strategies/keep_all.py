"""keep_all: keeps every visual token. Runs the full pruning machinery, so it must equal vanilla."""
from __future__ import annotations

import torch

from prunekit.pruner import Keep, PruneContext, Stage, TokenPruner
from prunekit.registry import register_strategy

from ._placement import default_policy, single_site


@register_strategy("keep_all")
class KeepAll(TokenPruner):
    def __init__(self, stage: str = "vision_output", layer: int | None = None, positions: str | None = None):
        super().__init__(budget=None)
        self.site = single_site(stage, layer, tuple(Stage), "keep_all")
        self.position_policy = default_policy(self.site, positions)

    def sites(self):
        return [self.site]

    def prune(self, ctx: PruneContext) -> Keep:
        return Keep([torch.arange(int(n)) for n in ctx.lengths])

    def params(self):
        return {**super().params(), "stage": str(self.site.stage), "layer": self.site.layer}

"""random: a uniform subset of ``budget`` visual tokens, kept in original order (docs/strategies.md).

Each unit (image at vision stages, sample at ``llm_layer``) draws from a generator seeded by its image
content, so a sample keeps the same tokens whatever batch it is in.
"""
from __future__ import annotations

import torch

from prunekit.pruner import Keep, PruneContext, Stage, TokenPruner
from prunekit.registry import register_strategy

from ._placement import convention, default_policy, single_site


@register_strategy("random")
class RandomPruner(TokenPruner):
    def __init__(self, budget: int = 64, stage: str = "vision_output", layer: int | None = None,
                 positions: str | None = None):
        site = single_site(stage, layer, tuple(Stage), "random")
        super().__init__(budget, convention(site))
        self.site = site
        self.position_policy = default_policy(site, positions)

    def sites(self):
        return [self.site]

    def prune(self, ctx: PruneContext) -> Keep:
        keep = []
        for u in range(ctx.num_units):
            draw = torch.randperm(int(ctx.lengths[u]), generator=ctx.generator(u))
            keep.append(draw[: ctx.target(u)].sort().values)
        return Keep(keep)

    def params(self):
        return {**super().params(), "stage": str(self.site.stage), "layer": self.site.layer}

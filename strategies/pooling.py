"""pooling: 2-D average pooling of the patch grid down to exactly ``budget`` tokens (docs/strategies.md).

The output grid (rows x cols) multiplies to the budget and is the factor pair closest to the input
grid's aspect ratio: 64 on 24x24 -> 8x8, 144 -> 12x12, 192 -> 16x12. Windows follow adaptive average
pooling (``start = floor(i*H/h)``, ``end = ceil((i+1)*H/h)``). Each pooled token's representative is
the window's centre patch; its members are the window's patches. Positions are compact (a regular grid).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from prunekit.pruner import Keep, PruneContext, Stage, TokenPruner
from prunekit.registry import register_strategy

from ._placement import convention, single_site


def pool_grid(rows: int, cols: int, budget: int) -> tuple[int, int]:
    """The (h, w) with h*w == budget, h <= rows, w <= cols, closest in aspect ratio to rows x cols."""
    if budget >= rows * cols:
        return rows, cols
    pairs = [(h, budget // h) for h in range(1, rows + 1) if budget % h == 0 and budget // h <= cols]
    if not pairs:
        lower = max(h * w for h in range(1, rows + 1) for w in range(1, cols + 1) if h * w <= budget)
        raise ValueError(
            f"pooling cannot produce exactly {budget} tokens from a {rows}x{cols} grid (no h x w = {budget} "
            f"fits); the nearest smaller budget it can produce is {lower}"
        )
    return min(pairs, key=lambda p: (abs(math.log((p[0] / p[1]) / (rows / cols))), -p[0]))  # ties: more rows


def pool_windows(rows: int, cols: int, h: int, w: int) -> tuple[Tensor, list[Tensor]]:
    """Representatives (h*w,) and members (raster indices) of adaptive-average-pooling windows."""
    spans = lambda n, m: [(i * n // m, -(-(i + 1) * n // m)) for i in range(m)]  # noqa: E731
    reps, members = [], []
    for r0, r1 in spans(rows, h):
        for c0, c1 in spans(cols, w):
            rr, cc = torch.meshgrid(torch.arange(r0, r1), torch.arange(c0, c1), indexing="ij")
            members.append((rr * cols + cc).flatten())
            reps.append(((r0 + r1 - 1) // 2) * cols + (c0 + c1 - 1) // 2)
    return torch.tensor(reps), members


@register_strategy("pooling")
class Pooling(TokenPruner):
    def __init__(self, budget: int = 64, stage: str = "vision_output", layer: int | None = None,
                 positions: str | None = None):
        site = single_site(stage, layer, tuple(Stage), "pooling")
        super().__init__(budget, convention(site))
        self.site = site
        self.position_policy = positions or "compact"

    def sites(self):
        return [self.site]

    def supports(self, adapter) -> str | None:
        stage = self.site.stage
        if adapter.packed_vision and stage in (Stage.VISION_LAYER, Stage.VISION_OUTPUT):
            return (f"pooling averages tokens at {stage}, before the PatchMerger, which needs whole 2x2 patch groups; "
                    "use stage=projector_output (pooling the merged tokens) or llm_layer")
        if adapter.full_grid_features and stage is Stage.VISION_LAYER:
            return ("pooling averages tokens, and inside this vision encoder the runtime keeps or drops whole patch "
                    "groups (the model groups them after it, InternVL's pixel shuffle); use stage=vision_output")
        if not adapter.raster_images and stage is Stage.LLM_LAYER:
            return ("pooling needs each image's tokens as one raster grid, and an image is several vision units here "
                    "(LLaVA-NeXT: a base crop, a high-resolution grid and row newlines; InternVL: tiles); use a "
                    "vision-side stage (it pools every unit)")
        return None

    def prune(self, ctx: PruneContext) -> Keep:
        indices, features, members = [], [], []
        for u in range(ctx.num_units):
            grid = ctx.grids[u]
            if grid is None:
                raise ValueError(f"pooling needs an intact patch grid at {ctx.site}; unit {u} has none "
                                 "(already pruned, or several images)")
            h, w = pool_grid(*grid, ctx.target(u))
            reps, mem = pool_windows(*grid, h, w)
            weights = torch.zeros(len(mem), grid[0] * grid[1], dtype=ctx.tokens.dtype, device=ctx.tokens.device)
            for j, m in enumerate(mem):
                weights[j, m] = 1.0 / len(m)
            indices.append(reps)
            features.append(weights @ ctx.tokens[u, : grid[0] * grid[1]])
            members.append(mem)
        return Keep(indices, features, members)

    def params(self):
        return {**super().params(), "stage": str(self.site.stage), "layer": self.site.layer}

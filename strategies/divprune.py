"""divprune: a maximally diverse subset of the projected image tokens (DivPrune, CVPR'25; docs/strategies/divprune.md).

Per image, on the projected embeddings x (before the language model), with D_ij = 1 − cos(x_i, x_j):

  1. first   the token farthest from its nearest neighbour: argmax_i min_{j≠i} D_ij
  2. repeat  add argmax_{i∉S} min_{j∈S} D_ij (max–min diversity, greedy) until |S| = k
             k = budget, or round(keep_ratio·N) (the reference's SUBSET_RATIO = 0.098: 56 of 576)
  3. keep    S in original order (the sequence is rebuilt: compact positions)

The greedy loop keeps a running min over the selected set (one N-vector per step), not the reference's
Python recomputation; ties go to the lower index (torch.argmax).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.nn.functional import normalize

from prunekit.budget import kept_fraction
from prunekit.pruner import Keep, PruneContext, Site, Stage, TokenPruner
from prunekit.registry import register_strategy


@register_strategy("divprune")
class DivPrune(TokenPruner):
    def __init__(self, budget: int | None = None, keep_ratio: float = 0.098, positions: str = "compact",
                 ratio: float | None = None):  # ratio: deprecated, the old name of keep_ratio
        super().__init__(budget, "n_in")
        if ratio is not None:
            warnings.warn("divprune's ratio= is deprecated: use keep_ratio= (the same share kept)", DeprecationWarning,
                          stacklevel=2)
            keep_ratio = ratio
        self.keep_ratio = kept_fraction("divprune", keep_ratio)
        self.position_policy = positions

    def sites(self):
        return [Site(Stage.PROJECTOR_OUTPUT)]

    def prune(self, ctx: PruneContext) -> Keep:
        keep = []
        for u in range(ctx.num_units):
            n = int(ctx.lengths[u])
            k = ctx.target(u) if self.budget is not None else max(1, min(n, round(self.keep_ratio * n)))
            keep.append(max_min_diverse(ctx.tokens[u, :n], k).sort().values)
        return Keep(keep)

    def params(self):
        return {**super().params(), "keep_ratio": None if self.budget is not None else self.keep_ratio}


def max_min_diverse(x: Tensor, k: int) -> Tensor:
    """Greedy max–min subset of k rows of x under the cosine distance 1 − cos, in selection order."""
    unit = normalize(x.float(), dim=-1)
    distance = 1 - unit @ unit.T  # (N, N)
    n = distance.shape[0]
    nearest = distance.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), float("inf")).min(1).values
    chosen = [int(nearest.argmax())] if n > 1 else [0]
    closest = distance[chosen[0]].clone()  # each token's distance to the selected set
    closest[chosen[0]] = float("-inf")
    for _ in range(k - 1):
        nxt = int(closest.argmax())
        chosen.append(nxt)
        closest = torch.minimum(closest, distance[nxt])
        closest[nxt] = float("-inf")  # min(−inf, ·) keeps the earlier ones out
    return torch.tensor(chosen, dtype=torch.long, device=x.device)

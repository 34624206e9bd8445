"""visionzip: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity
(VisionZip, CVPR'25; docs/strategies/visionzip.md).

Per image, at the vision feature layer (LLaVA: layer −2's output H, before the projector):

  1. dominant    s_j = [CLS]'s attention to patch j, head mean (the reference sums heads: same ranking)
                 D = {CLS} ∪ the top d−1 patches by s (`cls=True`, the reference), or the top d patches
  2. metric      m_i = the feature layer's key of patch i, mean over heads, L2-normalised
  3. targets     R = the other patches in order; every ⌊|R|/c⌋-th of R from the first, c of them
  4. merge       each remaining patch joins the target with the largest ⟨m_o, m_t⟩;
                 ctx_t = H[t] + mean of its members' H (`merge="target_plus_mean"`, the reference: not a
                 convex average) or the plain mean of the target and its members (`merge="mean"`)
  5. output      [CLS, dominant patches in order, contextual tokens in target order] → projector; n_in = d + c

The trace lists each contextual token with its target as representative and its members; the [CLS] token
stands for no patch (empty members) and takes the first free slot as its representative.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.functional import normalize

from prunekit.pruner import Keep, PruneContext, Site, Stage, TokenPruner
from prunekit.registry import register_strategy
from prunekit.signals import AttentionRows, Signals

from ._placement import needs_cls

# budget -> (dominant, contextual) for LLaVA-1.5 [LC configs/.../visionzip.yml; VZ README: 54+10 for 64]
SPLITS = {192: (162, 30), 128: (108, 20), 64: (54, 10)}
MERGES = ("target_plus_mean", "mean")


@register_strategy("visionzip")
class VisionZip(TokenPruner):
    image_newlines = "drop"  # LLaVA-NeXT: the reference does not re-insert the row newlines
    def __init__(
        self,
        budget: int = 64,  # d + c tokens per image entering the LLM (n_in)
        dominant: int | None = None,  # d; None = the reference split for the budget (54+10, 108+20, 162+30)
        contextual: int | None = None,  # c
        cls: bool = True,  # feed [CLS]'s feature as one of the d dominant tokens (the reference)
        merge: str = "target_plus_mean",  # target_plus_mean (reference) | mean (a convex average)
        positions: str = "compact",
    ):
        super().__init__(budget, "n_in")
        if merge not in MERGES:
            raise ValueError(f"unknown visionzip merge {merge!r}; choose one of {MERGES}")
        self.split_given = (dominant, contextual)
        self.cls, self.merge = cls, merge
        self.dominant, self.contextual = split(budget, dominant, contextual, cls)
        self.position_policy = positions

    def bind(self, adapter) -> None:
        """LLaVA-NeXT: every crop gets the split of budget / (most crops), as the reference configs (640 = 5 x
        (108 + 20)); a split given explicitly is per crop."""
        units = adapter.budget_units()
        if units > 1 and self.split_given == (None, None):
            self.dominant, self.contextual = split(max(self.budget.tokens // units, 1), None, None, self.cls)

    def sites(self):
        return [Site(Stage.VISION_OUTPUT)]

    def signals(self, site: Site):
        return Signals(rows=(AttentionRows("first"),), keys=True, prefix=self.cls)

    def supports(self, adapter) -> str | None:
        if self.cls and adapter.vision_prefix_tokens and adapter.merge_size > 1:
            return ("VisionZip feeds [CLS]'s feature to the projector as a dominant token, and this model's projector "
                    "takes tokens of several patches each (InternVL's pixel shuffle), where one [CLS] has no place; "
                    "use cls=false (d dominant patch groups)")
        return needs_cls(adapter, "VisionZip")

    def prune(self, ctx: PruneContext) -> Keep:
        scores = ctx.attention("first").float()
        metric = normalize(ctx.keys().float().mean(1), dim=-1)  # (U, N, d)
        cls = ctx.prefix_tokens()[:, 0] if self.cls else None
        indices, features, members, order = [], [], [], []
        for u in range(ctx.num_units):
            n = int(ctx.lengths[u])
            tokens = ctx.tokens[u, :n]
            d = min(self.dominant - int(self.cls), n)
            top = torch.sort(scores[u, :n], descending=True, stable=True).indices[:d].sort().values
            rest = torch.ones(n, dtype=torch.bool, device=tokens.device)
            rest[top] = False
            targets, groups = contextual_groups(rest.nonzero().squeeze(1), metric[u, :n], self.contextual)
            merged = [merge(tokens[t], tokens[g[g != t]], self.merge) for t, g in zip(targets.tolist(), groups)]
            out_idx = [top, targets]
            out_feat = [tokens[top], torch.stack(merged) if merged else tokens[:0]]
            out_members = [[i.view(1) for i in top], groups]
            out_order = [top, n + torch.arange(len(targets), device=tokens.device)]
            if self.cls:  # the [CLS] token: first in the sequence, standing for no patch, in the first free slot
                used = torch.zeros(n + 1, dtype=torch.bool, device=tokens.device)
                used[torch.cat([top, targets])] = True
                slot = used.logical_not().nonzero()[0]
                out_idx.insert(0, slot)
                out_feat.insert(0, cls[u : u + 1].to(tokens.dtype))
                out_members.insert(0, [slot.new_zeros(0)])
                out_order.insert(0, torch.full((1,), -1, device=tokens.device))
            indices.append(torch.cat(out_idx))
            features.append(torch.cat(out_feat))
            members.append([m for part in out_members for m in part])
            order.append(torch.cat(out_order))
        return Keep(indices, features, members, order=order)

    def params(self):
        return {**super().params(), "dominant": self.dominant, "contextual": self.contextual, "cls": self.cls,
                "merge": self.merge}


def contextual_groups(rest: Tensor, metric: Tensor, c: int) -> tuple[Tensor, list[Tensor]]:
    """Targets (every ⌊|R|/c⌋-th remaining index from the first) and each target's group (itself + members)."""
    if c == 0 or len(rest) == 0:
        return rest[:0], []
    step = max(len(rest) // c, 1)
    targets = rest[::step][:c]
    others = rest[~torch.isin(rest, targets)]
    join = (metric[others] @ metric[targets].T).argmax(1) if len(others) else others
    groups = [torch.cat([t.view(1), others[join == j]]).sort().values for j, t in enumerate(targets)]
    return targets, groups


def merge(target: Tensor, members: Tensor, how: str) -> Tensor:
    """ctx_t = H[t] + mean of the members (0 if none) — the reference — or the mean of target and members."""
    if how == "mean":
        return torch.cat([target[None], members]).float().mean(0).to(target.dtype)
    return target + (members.float().mean(0).to(target.dtype) if len(members) else torch.zeros_like(target))


def split(budget: int, dominant: int | None, contextual: int | None, cls: bool) -> tuple[int, int]:
    """(dominant, contextual) for a budget: the reference split (54+10, 108+20, 162+30; else 84% / 16%)."""
    if dominant is None and contextual is None:
        dominant, contextual = SPLITS.get(budget, (None, None))
        if dominant is None:  # the reference splits are 84% / 16%
            contextual = max(1, round(budget * 10 / 64)) if budget > 1 else 0
            dominant = budget - contextual
    elif dominant is None or contextual is None:
        dominant = budget - contextual if dominant is None else dominant
        contextual = budget - dominant if contextual is None else contextual
    if dominant + contextual != budget or dominant < (1 if cls else 0) or contextual < 0:
        raise ValueError(f"visionzip needs dominant + contextual = budget with dominant >= {int(cls)} "
                         f"(the [CLS] token); got {dominant} + {contextual} for budget {budget}")
    return dominant, contextual

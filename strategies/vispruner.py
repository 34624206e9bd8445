"""vispruner: important tokens by [CLS] attention, then diverse tokens by duplicate removal
(VisPruner, ICCV'25; docs/strategies/vispruner.md).

Per image (LLaVA-NeXT: per crop), at the vision feature layer (LLaVA: layer −2's output, before the projector):

  1. split       T_imp = int(T·ρ) important tokens (floor of the float product), T_div = T − T_imp diverse ones
  2. important   a_j = [CLS]'s attention to patch j, head mean (raw probabilities over all 577 keys);
                 order = patches by a, descending (stable: ties to the lower index); keep order[:T_imp]
  3. diverse     R = order[T_imp:] (descending attention). While |R| > T_div, in rounds:
                   r = min(8, |R| − T_div); A = R[0::2], B = R[1::2];
                   score(a) = max_b cos(x_a, x_b) on the layer −2 patch states x (fp32);
                   drop the r members of A with the highest score (at most |A|);
                   R ← kept A in descending-score order ++ B
  4. keep        important ∪ R, in original order (compact positions)

Qwen2-VL / 2.5-VL (no [CLS]; the maintainer's procedure): a = the attention each merge group receives from every
query ('all' rows, summed over the group's patches) and x = the group's mean patch state.
`parity=True` reproduces the official loop where it differs (odd |R|, r > |A|): docs/strategies/vispruner.md.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.functional import normalize

from prunekit.pruner import Keep, PruneContext, Site, Stage, TokenPruner
from prunekit.registry import register_strategy
from prunekit.signals import AttentionRows, Signals


@register_strategy("vispruner")
class VisPruner(TokenPruner):
    image_newlines = "drop"  # LLaVA-NeXT: the reference lays crops out without row newlines

    def __init__(
        self,
        budget: int = 64,  # T per image entering the LLM (n_in); LLaVA-NeXT: T // 5 per crop
        important_ratio: float = 0.5,  # ρ: the official argparse default; README: 0.75 at 64 tokens (MME)
        max_per_round: int = 8,  # duplicates removed per round at most
        parity: bool = False,  # the official loop's failures: short output on odd |R|, an error when r > |A|
        positions: str = "compact",
    ):
        super().__init__(budget, "n_in")
        if not 0.0 <= important_ratio <= 1.0:
            raise ValueError(f"vispruner: important_ratio is the share of important tokens in [0, 1], got {important_ratio}")
        if max_per_round < 1:
            raise ValueError(f"vispruner: max_per_round must be >= 1, got {max_per_round}")
        self.important_ratio, self.max_per_round, self.parity = important_ratio, max_per_round, parity
        self.position_policy = positions
        self.query = "first"

    def bind(self, adapter) -> None:
        self.query = "first" if adapter.vision_prefix_tokens >= 1 else "all"  # no [CLS]: attention received

    def sites(self):
        return [Site(Stage.VISION_OUTPUT)]

    def signals(self, site: Site):
        return Signals(rows=(AttentionRows(self.query),))

    def prune(self, ctx: PruneContext) -> Keep:
        scores = ctx.attention(self.query).float()
        keep = []
        for u in range(ctx.num_units):
            n = int(ctx.lengths[u])
            keep.append(vispruner_select(scores[u, :n], ctx.tokens[u, :n], ctx.target(u), self.important_ratio,
                                         self.max_per_round, self.parity))
        return Keep(keep)

    def params(self):
        return {**super().params(), "important_ratio": self.important_ratio, "max_per_round": self.max_per_round,
                "parity": self.parity, "importance": self.query}


def vispruner_select(attention: Tensor, features: Tensor, budget: int, important_ratio: float,
                     max_per_round: int = 8, parity: bool = False) -> Tensor:
    """Kept indices (ascending) of one unit: ``attention`` (N,), ``features`` (N, D)."""
    n_important = int(budget * important_ratio)
    n_diverse = budget - n_important
    order = torch.sort(attention, descending=True, stable=True).indices
    important, rest = order[:n_important], order[n_important:]
    unit = normalize(features.float(), dim=-1)
    similarity = unit[rest] @ unit[rest].T if n_diverse > 0 else None  # once; the rounds index into it
    position = torch.full((len(attention),), -1, dtype=torch.long, device=attention.device)
    position[rest] = torch.arange(len(rest), device=attention.device)
    while n_diverse > 0:
        r = min(max_per_round, len(rest) - n_diverse)
        if r <= 0:
            break
        a, b = rest[0::2], rest[1::2]
        if parity and (r > len(a) or (len(a) != len(b) and len(b) - r != 1)):
            rest = _official_round(a, b, r, rest)
            continue
        r = min(r, len(a))
        score = similarity[position[a]][:, position[b]].max(1).values if len(b) else torch.full((len(a),), float("-inf"))
        by_score = torch.sort(score, descending=True, stable=True).indices
        rest = torch.cat([a[by_score[r:]], b])
    return torch.cat([important, rest[:n_diverse] if n_diverse > 0 else rest[:0]]).sort().values


def _official_round(a: Tensor, b: Tensor, r: int, rest: Tensor) -> Tensor:
    """The official round where it differs from the fixed one. Its gather index is sized |B| − r: with odd |R| a
    size-1 index broadcasts (the fixed result, not routed here), size 0 drops every member of A (a short output),
    any other size, or r > |A|, raises."""
    if r > len(a) or len(b) - r != 0:
        raise RuntimeError(f"vispruner parity=True: the official code raises here (|R| = {len(rest)}, r = {r}, "
                           f"|A| = {len(a)}); use parity=False for the fixed loop")
    return b

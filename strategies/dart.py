"""dart: keep the image tokens least like a few pivots — duplication, not importance (DART, EMNLP'25; docs/strategies/dart.md).

Once, before decoder layer K (default 2), per sample, with no attention weights:

  1. pivots  the `pivots_image` image tokens and `pivots_text` text tokens (after the image) with the largest
             L1 norm of their layer-(K−1) keys (after RoPE, all heads concatenated)
  2. space   h = the language model's final norm of the hidden states entering layer K (layer K−1's output)
  3. pick    candidates = image tokens that are not pivots; for each pivot p in turn (image pivots by
             decreasing key norm, then text pivots), take the `per` candidates with the LOWEST cos(h_p, h_c)
             and remove them from the candidates
  4. keep    the image pivots and every token taken, in original order, at their original positions

Counts: the reference scripts pass a target t and take per = t // 8 with 8 pivots, keeping 4 + 8·per
(132 for "128", 68 for "64"). prunekit keeps exactly `budget` by default (the picks share budget − 4,
the first pivots taking one more where it does not divide); `parity_count=True` keeps the reference's 4 + 8·(t // 8).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.functional import normalize

from prunekit.pruner import Keep, PruneContext, Site, Stage, TokenPruner
from prunekit.registry import register_strategy
from prunekit.signals import Signals


@register_strategy("dart")
class DART(TokenPruner):
    def __init__(
        self,
        budget: int = 128,  # image tokens kept after layer K (n_final); the reference's max_num_trunction
        layer: int = 2,  # K: prune before decoder layer K, with layer K−1's keys and output
        pivots_image: int = 4,
        pivots_text: int = 4,
        parity_count: bool = False,  # True: keep pivots_image + (pivots)·(budget // pivots) as the reference scripts
        positions: str = "original",  # DART keeps the original positions
    ):
        super().__init__(budget, "n_final")
        if not (isinstance(layer, int) and layer >= 1):
            raise ValueError(f"dart's layer K must be an integer >= 1 (it reads layer K−1's keys), got {layer!r}")
        if pivots_image < 0 or pivots_text < 0 or pivots_image + pivots_text < 1:
            raise ValueError("dart needs at least one pivot (pivots_image + pivots_text >= 1)")
        if pivots_image > budget:
            raise ValueError(f"dart keeps its {pivots_image} image pivots: the budget must be at least that, got {budget}")
        self.layer, self.pivots_image, self.pivots_text, self.parity_count = layer, pivots_image, pivots_text, parity_count
        self.position_policy = positions

    def bind(self, adapter) -> None:
        if self.layer >= adapter.num_llm_layers:
            raise ValueError(f"dart prunes before decoder layer K={self.layer}, but the language model has "
                             f"{adapter.num_llm_layers} layers: choose 1 <= layer <= {adapter.num_llm_layers - 1}")

    def sites(self):
        return [Site(Stage.LLM_LAYER, self.layer)]

    def signals(self, site: Site):
        return Signals(keys=True)

    def prune(self, ctx: PruneContext) -> Keep:
        norms, text_norms = key_l1(ctx.keys()), key_l1(ctx.text_keys())  # (U, N), (U, R); keys after RoPE
        text, text_valid = ctx.text_tokens()
        hidden, text = ctx.output_norm(ctx.tokens).float(), ctx.output_norm(text).float()
        keep = []
        for u in range(ctx.num_units):
            n, r = int(ctx.lengths[u]), int(text_valid[u].sum())
            keep.append(self.select(norms[u, :n], hidden[u, :n], text_norms[u, :r], text[u, :r]))
        return Keep(keep)

    def select(self, norms: Tensor, hidden: Tensor, text_norms: Tensor, text: Tensor) -> Tensor:
        """One sample: kept image-token indices, ascending."""
        n = len(norms)
        image_pivots = norms.topk(min(self.pivots_image, n)).indices
        text_pivots = text_norms.topk(min(self.pivots_text, len(text_norms))).indices
        pivots = [hidden[i] for i in image_pivots] + [text[i] for i in text_pivots]
        quota = self.quotas(len(pivots), min(self.budget.tokens, n) - len(image_pivots))
        candidates = torch.ones(n, dtype=torch.bool, device=hidden.device)
        candidates[image_pivots] = False
        unit, taken = normalize(hidden, dim=-1), [image_pivots]
        for pivot, per in zip(pivots, quota):
            per = min(per, int(candidates.sum()))  # a guard the reference lacks (DART#18)
            if per == 0:
                continue
            similarity = (unit @ normalize(pivot, dim=-1)).masked_fill(~candidates, float("inf"))
            pick = torch.sort(similarity, stable=True).indices[:per]  # the least similar; ties: lower index
            candidates[pick] = False
            taken.append(pick)
        return torch.cat(taken).sort().values

    def quotas(self, n_pivots: int, picks: int) -> list[int]:
        """Tokens each pivot takes: the reference's budget // pivots each, or exactly `picks` shared out."""
        if self.parity_count:
            return [self.budget.tokens // n_pivots] * n_pivots
        return [picks // n_pivots + (1 if i < picks % n_pivots else 0) for i in range(n_pivots)]

    def params(self):
        return {**super().params(), "layer": self.layer, "pivots_image": self.pivots_image,
                "pivots_text": self.pivots_text, "parity_count": self.parity_count}


def key_l1(keys: Tensor) -> Tensor:
    """(U, Hkv, n, d) keys -> (U, n): the L1 norm of each token's key, all heads concatenated, in fp32."""
    return keys.float().transpose(1, 2).flatten(2).abs().sum(-1)

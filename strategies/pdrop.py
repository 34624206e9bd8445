"""pdrop: multi-stage drops inside the LLM, a pyramid of image tokens (PyramidDrop, CVPR'25; docs/strategies/pdrop.md).

The decoder is split at boundaries b_1 < ... < b_S (default [8, 16, 24] on 32 layers: the 1-based index of
the layer just executed = the 0-based index of the next block). Per sample with N image tokens entering
the LLM, at each boundary b_s, before block b_s runs:

  1. score   x = block b's input RMSNorm of the hidden states entering it (the current, already cut sequence)
             q = RoPE(W_q x) at the last prompt token,  K = RoPE(W_k x) at the current positions
             s_j = head mean of softmax(q·Kᵀ/√d) over all keys (causal; GQA keys repeated), at the image tokens
  2. count   n_s = int(N·λ^s)  (λ = 0.5), or int(N·ratio_list[s-1]), or λ from a budget:
               n_avg:   the largest λ with (1/T) Σ_s (b_{s+1} - b_s)·int(N·λ^s) <= budget   (bisection)
               n_final: λ = (budget/N)^(1/S), the last stage keeping exactly `budget`
  3. keep    the top n_s image tokens by s (ties: lower index), in original order; positions re-compacted
"""
from __future__ import annotations

import torch

from prunekit.pruner import Keep, PruneContext, Site, Stage, TokenPruner
from prunekit.registry import register_strategy
from prunekit.signals import AttentionRows, Signals
from prunekit.budget import schedule_average

from prunekit.ops import select_top

CONVENTIONS = ("n_avg", "n_final")


@register_strategy("pdrop")
class PyramidDrop(TokenPruner):
    def __init__(
        self,
        layer_list: list[int] | None = None,  # boundaries b_s; None = [T/4, T/2, 3T/4] ([8, 16, 24] on 32 layers)
        lam: float = 0.5,  # λ: stage s keeps int(N·λ^s) (used without ratio_list / budget)
        ratio_list: list[float] | None = None,  # explicit ρ_s per stage (share of the original N), overrides lam
        budget: int | None = None,  # visual tokens under `convention`; λ is derived from it
        convention: str = "n_avg",  # n_avg: layer-averaged (the paper's "average tokens") | n_final: last stage
        positions: str = "compact",  # PDrop re-compacts positions at every stage
    ):
        if convention not in CONVENTIONS:
            raise ValueError(f"pdrop budgets use convention n_avg or n_final, got {convention!r}")
        super().__init__(budget, convention)
        if budget is not None and ratio_list is not None:
            raise ValueError("pdrop takes a budget (λ derived from it) or a ratio_list, not both")
        if not 0.0 < lam <= 1.0:
            raise ValueError(f"lam (λ) must be in (0, 1], got {lam}")
        if ratio_list is not None:
            ratio_list = [float(r) for r in ratio_list]
            if not all(0.0 <= r <= 1.0 for r in ratio_list) or ratio_list != sorted(ratio_list, reverse=True):
                raise ValueError(f"ratio_list must be non-increasing shares in [0, 1], got {ratio_list}")
        self.layer_list = None if layer_list is None else [int(b) for b in layer_list]
        self.lam, self.ratio_list = lam, ratio_list
        self.position_policy = positions
        self._layers = self.layer_list
        self._n_in: dict[int, int] = {}  # per sample: image tokens entering the LLM (set at the first stage)

    # --- where ----------------------------------------------------------------------------------------
    def bind(self, adapter) -> None:
        depth = adapter.num_llm_layers
        layers = self.layer_list or [depth // 4, depth // 2, 3 * depth // 4]
        if layers != sorted(set(layers)) or layers[0] < 1 or layers[-1] >= depth:
            raise ValueError(f"pdrop layer_list {layers} must be increasing boundaries in 1..{depth - 1} "
                             f"(the language model has {depth} layers), e.g. {[depth // 4, depth // 2, 3 * depth // 4]}")
        if self.ratio_list is not None and len(self.ratio_list) != len(layers):
            raise ValueError(f"ratio_list has {len(self.ratio_list)} ratios for {len(layers)} boundaries {layers}")
        self._layers = layers
        if adapter.tokens_per_image() is not None:  # an unreachable budget fails at attach, not mid-forward
            self.stage_counts(adapter.tokens_per_image(), depth)

    def sites(self):
        if self._layers is None:
            raise RuntimeError("pdrop's default boundaries depend on the model: attach() binds them (or pass layer_list=)")
        return [Site(Stage.LLM_LAYER, b) for b in self._layers]

    def signals(self, site: Site):
        return Signals(rows=(AttentionRows("last"),), pre=True)  # block b's own q, k on its input

    # --- per stage ------------------------------------------------------------------------------------
    def prune(self, ctx: PruneContext) -> Keep:
        stage = self._layers.index(ctx.layer)
        if stage == 0:  # a new prefill: remember each sample's N
            self._n_in = {b: int(n) for b, n in zip(ctx.sample_of, ctx.lengths)}
        scores = ctx.attention("last").float()
        live = torch.arange(scores.shape[1], device=scores.device)[None] < ctx.lengths.to(scores.device)[:, None]
        counts = torch.tensor([min(self.stage_counts(self._n_in[b], ctx.num_layers)[stage], int(n))
                               for b, n in zip(ctx.sample_of, ctx.lengths)])
        return Keep(select_top(scores, live, counts))

    def stage_counts(self, n: int, num_layers: int) -> list[int]:
        """Image tokens kept after each boundary for a sample with n image tokens entering the LLM."""
        stages = len(self._layers)
        if self.ratio_list is not None:
            return [int(n * r) for r in self.ratio_list]
        if self.budget is None:
            return pyramid(n, self.lam, stages)
        target = min(self.budget.tokens, n)
        if self.budget.convention == "n_final":
            lam = (target / n) ** (1 / stages)
            return [max(c, target) for c in pyramid(n, lam, stages - 1)] + [target]
        return pyramid(n, lambda_for_average(target, n, self._layers, num_layers), stages)

    def params(self):
        return {**super().params(), "layer_list": self._layers, "lam": self.lam, "ratio_list": self.ratio_list}


def pyramid(n: int, lam: float, stages: int) -> list[int]:
    """int(n·λ^s) for s = 1..stages (int() of the original count times the ratio, as the reference)."""
    return [int(n * lam**s) for s in range(1, stages + 1)]


def lambda_for_average(target: float, n: int, boundaries: list[int], num_layers: int, steps: int = 60) -> float:
    """The largest λ in [0, 1] whose pyramid averages at most ``target`` visual tokens over the layers.

    The average is a non-decreasing step function of λ, from b_1·N/T (λ → 0: only the layers before the
    first boundary see image tokens) to N (λ = 1); a target outside that range is an error.
    """
    def average(lam: float) -> float:
        return schedule_average(n, boundaries, pyramid(n, lam, len(boundaries)), num_layers)

    lowest = average(0.0)
    if target < lowest:
        raise ValueError(
            f"pdrop cannot average {target} visual tokens over {num_layers} layers with layer_list {boundaries}: "
            f"the first {boundaries[0]} layers see all {n} image tokens, so the average is at least {lowest:g} "
            f"(λ → 0). Reachable n_avg targets for {n} image tokens: {lowest:g}..{n}; move the first boundary "
            "earlier or use convention=n_final"
        )
    lo, hi = 0.0, 1.0
    if average(hi) <= target:
        return hi
    for _ in range(steps):  # average(lo) <= target < average(hi)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if average(mid) <= target else (lo, mid)
    return lo

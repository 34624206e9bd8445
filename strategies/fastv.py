"""fastv: one cut inside the LLM by the attention the image tokens receive (FastV, ECCV'24; docs/strategies/fastv.md).

Once, before decoder layer K (default 2: layers 0..K-1 see every token), per sample with N image tokens:

  1. score   s_j = head mean of softmax(q·Kᵀ/√d) of layer K-1 over ALL keys, read at the image tokens
               query = last: the last prompt token's row (all released code)
                     = all:  the mean over every live query's row (the paper's φ(j) = 1/n Σ_i A(i, j), causal)
  2. count   k = round(N·(1 - R))                          drop ratio R (the HF version; keep_ratio = 1 - R)
               k = min(budget, N)                          budget, convention n_final
               k = round((T·t - K·N) / (T - K)) in [1, N]  budget t, convention n_avg (T decoder layers)
  3. keep    the top-k image tokens by s (ties: lower index), in original order, at their original positions;
             inplace: the others leave the sequence; mask: they stay (still computed) and no later query
             attends to them (the FastV README's evaluation path: no speed-up)
"""
from __future__ import annotations

import warnings

import torch

from prunekit.pruner import Keep, PruneContext, Site, Stage, TokenPruner
from prunekit.registry import register_strategy
from prunekit.signals import AttentionRows, Signals
from prunekit.budget import kept_fraction, single_cut_keep

from prunekit.ops import select_top

QUERIES = ("last", "all")
VARIANTS = ("inplace", "mask")
CONVENTIONS = ("n_final", "n_avg")


@register_strategy("fastv")
class FastV(TokenPruner):
    def __init__(
        self,
        layer: int = 2,  # K: prune before decoder layer K, scored by layer K-1's attention
        R: float | None = None,  # the paper's drop ratio, the share of image tokens dropped; None: 0.5 (paper default)
        budget: int | None = None,  # visual tokens, under `convention`; overrides the ratios
        keep_ratio: float | None = None,  # prunekit's convention, the share kept (= 1 - R); give it or R
        convention: str = "n_final",  # n_final: keep `budget` after layer K | n_avg: layer-averaged target
        query: str = "last",  # last (released code) | all (paper text: mean over all queries)
        variant: str = "inplace",  # inplace (tokens removed) | mask (masked out, still computed: no speed-up)
        positions: str = "original",  # FastV keeps the original RoPE positions (gaps)
        ratio: float | None = None,  # deprecated: the old name of R (the share dropped)
    ):
        if ratio is not None:
            warnings.warn("fastv's ratio= is deprecated: it is the paper's drop ratio, R= (or keep_ratio = 1 - R)",
                          DeprecationWarning, stacklevel=2)
            R = ratio
        if convention not in CONVENTIONS:
            raise ValueError(f"fastv budgets use convention n_final or n_avg, got {convention!r}")
        super().__init__(budget, convention)
        if query not in QUERIES:
            raise ValueError(f"unknown fastv query {query!r}; choose one of {QUERIES}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown fastv variant {variant!r}; choose one of {VARIANTS}")
        if keep_ratio is None and R is None:
            R = 0.5  # the paper's default
        self.keep_ratio = kept_fraction("fastv", keep_ratio, R) if budget is None else None
        if not (isinstance(layer, int) and layer >= 1):
            raise ValueError(f"fastv's layer K must be an integer >= 1 (K = 0, before the LLM, is random ranking "
                             f"in the paper: use strategy=random), got {layer!r}")
        self.layer, self.query, self.variant = layer, query, variant
        self.position_policy = positions

    def bind(self, adapter) -> None:
        layers = adapter.num_llm_layers
        if self.layer >= layers:
            raise ValueError(f"fastv prunes before decoder layer K={self.layer}, but the language model has "
                             f"{layers} layers: choose 1 <= layer <= {layers - 1}")
        if adapter.tokens_per_image() is not None:  # an unreachable budget fails at attach, not mid-forward
            self.keep_count(adapter.tokens_per_image(), layers)

    def sites(self):
        return [Site(Stage.LLM_LAYER, self.layer)]

    def signals(self, site: Site):
        return Signals(rows=(AttentionRows(self.query),))

    def prune(self, ctx: PruneContext) -> Keep:
        scores = ctx.attention(self.query).float()
        live = torch.arange(scores.shape[1], device=scores.device)[None] < ctx.lengths.to(scores.device)[:, None]
        counts = torch.tensor([self.keep_count(int(n), ctx.num_layers) for n in ctx.lengths])
        return Keep(select_top(scores, live, counts), mask_only=self.variant == "mask")

    def keep_count(self, n: int, num_layers: int) -> int:
        """k: image tokens kept after layer K for a sample with n image tokens."""
        if self.budget is None:
            return round(n * self.keep_ratio)
        target = self.budget.tokens
        if self.budget.convention == "n_final":
            return min(target, n)
        k = single_cut_keep(target, n, self.layer, num_layers)
        if k < 0:
            raise ValueError(
                f"fastv cannot average {target} visual tokens over {num_layers} layers with K={self.layer}: the "
                f"first {self.layer} layers see all {n} image tokens, so even keeping none after the cut averages "
                f"{self.layer * n / num_layers:g}. Reachable n_avg targets for {n} image tokens: "
                f"{self.layer * n / num_layers:g}..{n}; lower `layer` or use convention=n_final"
            )
        return min(max(round(k), 1), n)

    def params(self):
        return {
            **super().params(), "layer": self.layer, "keep_ratio": self.keep_ratio,
            "query": self.query, "variant": self.variant,
            "removes_tokens": self.variant == "inplace",  # mask: pruned tokens still computed, no speed-up
        }

"""flowcut: information-flow-aware progressive pruning inside the vision encoder (FlowCut, NeurIPS 2025).

docs/strategies/flowcut.md, per image, at every encoder layer l up to the final prune layer F-1 (the projector
reads layer F's output; LLaVA-1.5: F = L-2, so the last cut is on layer L-3's output):

  1. signals of layer l, from the relay's row only (no N x N map; the tower stays on sdpa):
       a   = relay -> patch attention, head mean (softmax over all keys, CLS included)
       s   = softmax_j(v_relay . v_j) over CLS and patches, head mean   (unscaled, as the CLIP code)
       nu  = || mean_h v_j ||_1
  2. score S = (a / sum a + s / sum s) * nu;   cumulative C = S at the first layer, else w C + (1-w) S
  3. rpl = (F-1) - l;  prune when rpl % n == 0:
       P = round((N - T) / sqrt(rpl) * (1 - (H(a / sum a) / ln N)^e))      rpl > 0 (0 log 0 = 0)
       P = N - T                                                          rpl = 0: the forced final cut
     keep the top max(N - P, T) patches by C, in raster order. CLS always stays and is not counted.

Two-stage families (docs/support.md, FlowCut's two stages): on LLaVA-NeXT every crop is cut to int(T/2) in the encoder, on
Qwen2-VL / 2.5-VL every image to 2T merged tokens (8T patches, relay = the mean query, no semantic term);
then, on the output of LLM layer 1 (site ``llm_layer[2]``), each sample is cut to exactly T:

  rel = mean_h softmax_vis(q_r k_vis / sqrt(d)),  sem = mean_h softmax_vis(v_r v_vis / sqrt(d)),
  nu = || mean_h v_vis ||_1,  S = (rel / sum rel + sem / sum sem) * nu,  keep the top T in order,

with r the last prompt token and the softmaxes over the visual tokens only. Any batch size, any padding,
sdpa (the references are batch 1, and the Qwen port's eager / FA2 paths do not run).

Reference bugs fixed by default, parity behind flags: the prune count is per image (``batch_coupled``
takes the batch max like the reference); zero probabilities give 0 log 0 = 0 instead of a crash.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from prunekit.budget import Budget
from prunekit.pruner import Keep, PruneContext, Site, Stage, TokenPruner
from prunekit.registry import register_strategy
from prunekit.signals import AttentionRows, Signals
from prunekit.ops import gather_rows, select_top
from prunekit.scoring import ScoreInputs, get_relay, get_score, normalise

SCHEDULES = ("adaptive", "uniform", "single_layer")
STACK_ELEMENTS = 1 << 24  # values scored in one stacked call (64 MB in fp32): bounds the extra peak memory


class LayerSignals(NamedTuple):
    """One layer's recorded signals (or several layers' stacked along the units); None where not needed."""

    attention: Tensor  # (U, N) the relay's head-mean attention
    values: Tensor | None  # (U, H, N, d)
    relay_value: Tensor | None  # (U, H, d)
    prefix_values: Tensor | None  # (U, H, P, d): CLS


@register_strategy("flowcut")
class FlowCut(TokenPruner):
    position_policy = "compact"
    image_newlines = "drop"  # LLaVA-NeXT: the reference lays multi-crop images out without row newlines

    def __init__(
        self,
        budget: int = 64,
        relay: str | None = None,  # whose view scores the patches: cls | mean_query | ...; None = cls, or
        # mean_query on towers without [CLS] (the Qwen port)
        score: str = "flowcut",  # registered score function combining the criteria
        attention_term: bool = True,  # criterion I^a: the relay's attention
        semantic_term: bool | None = None,  # criterion I^s: value-value similarity with the relay; None = on,
        # except on towers without [CLS] (the Qwen port has none)
        value_norm_term: bool = True,  # criterion I^d: L1 norm of the head-mean value
        semantic_scaled: bool = False,  # divide v.v by sqrt(d) (paper A.5, LLM stage) or not (CLIP code)
        history_weight: float = 0.5,  # EMA weight of the cumulative score (Tab. 10: 0 = current layer only)
        schedule: str = "adaptive",  # adaptive (entropy) | uniform (even split) | single_layer (final cut only)
        interval: int = 2,  # prune every n layers, counted back from the final cut (Tab. 11)
        final_layer: int | None = None,  # layer whose output gets the final cut; None = feature layer - 1
        entropy_exponent: float = 2.0,  # e in (1 - rho^e)
        batch_coupled: bool = False,  # paper parity: one prune count per batch (max over images)
        llm_stage: bool | None = None,  # cut to T after an LLM layer too; None = as the references: on for
        # LLaVA-NeXT and Qwen2-VL / 2.5-VL, off for LLaVA-1.5 (and for a language model that takes no cut: Qwen3.5)
        llm_layer: int = 2,  # the LLM cut is on the output of layer llm_layer - 1 (reference: index 1)
    ):
        super().__init__(budget, "n_in")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
        if not (isinstance(interval, int) and interval >= 1):
            raise ValueError(f"interval must be an integer >= 1, got {interval!r}")
        if not 0.0 <= history_weight < 1.0:
            raise ValueError(f"history_weight must be in [0, 1), got {history_weight}")
        if entropy_exponent <= 0:
            raise ValueError(f"entropy_exponent must be > 0, got {entropy_exponent}")
        if final_layer is not None and final_layer < 0:
            raise ValueError(f"final_layer must be >= 0, got {final_layer}")
        if not (isinstance(llm_layer, int) and llm_layer >= 1):
            raise ValueError(f"llm_layer must be an integer >= 1 (the cut follows layer llm_layer - 1), got {llm_layer!r}")
        self.relay_name, self.score_name = relay, score
        self.relay = None if relay is None else get_relay(relay)
        self.score_fn = get_score(score)
        self.attention_term, self.semantic_term, self.value_norm_term = attention_term, semantic_term, value_norm_term
        self.llm_stage, self.llm_layer = llm_stage, llm_layer
        self._relay, self._semantic, self._two_stage, self._unit_target = self.relay, semantic_term, False, None
        self.semantic_scaled, self.history_weight = semantic_scaled, history_weight
        self.schedule, self.interval, self.final_layer = schedule, interval, final_layer
        self.entropy_exponent, self.batch_coupled = entropy_exponent, batch_coupled
        self._final: int | None = final_layer
        self._sites: list[Site] | None = None
        self._cumulative: Tensor | None = None
        self._pending: list[LayerSignals] = []  # layers scored since the last cut, not yet folded into C
        self._tokens_key, self._tokens = None, None  # current_tokens() of the live set, while it lasts

    # --- where ----------------------------------------------------------------------------------------
    def bind(self, adapter) -> None:
        feature = adapter.vision_feature_layer
        self._final = feature - 1 if self.final_layer is None else self.final_layer
        if self._final < 0:
            raise ValueError(f"flowcut needs a vision layer before the feature layer ({feature}) to prune after")
        self._sites = None
        has_cls = adapter.vision_prefix_tokens > 0
        self._relay = self.relay or get_relay("cls" if has_cls else "mean_query")
        self._semantic = has_cls if self.semantic_term is None else self.semantic_term
        multi_unit = adapter.budget_units() > 1 or adapter.packed_vision
        # by family: as the references, but never where the language model takes no cut (Qwen3.5's hybrid LM)
        self._two_stage = (multi_unit and adapter.llm_site_refusal() is None) if self.llm_stage is None else self.llm_stage
        if self._two_stage and self.llm_layer >= adapter.num_llm_layers:
            raise ValueError(f"flowcut's LLM cut follows layer {self.llm_layer - 1}, but the language model has "
                             f"{adapter.num_llm_layers} layers; choose llm_layer <= {adapter.num_llm_layers - 1}")
        T = self.budget.tokens
        if not self._two_stage:
            self._unit_target = None  # the budget (split per crop where an image is several)
        elif adapter.packed_vision:
            self._unit_target = 2 * T  # 2T merged tokens = 8T patches (reference: visual.target_num * 4)
        else:
            self._unit_target = max(T // 2, 1)  # int(T/2) per crop
        self.budget = Budget(T, "n_final" if self._two_stage else "n_in")

    def prunes_at(self, layer: int) -> bool:
        rpl = self._final - layer
        if self.schedule == "single_layer":
            return rpl == 0
        return rpl >= 0 and rpl % self.interval == 0

    def sites(self):
        if self._final is None:
            raise RuntimeError("flowcut's layers depend on the model: attach() binds them (or pass final_layer=)")
        if self._sites is None:
            layers = range(self._final + 1)
            scored = layers if self.history_weight > 0 else filter(self.prunes_at, layers)
            self._sites = [Site(Stage.VISION_LAYER, layer) for layer in scored]
            if self._two_stage:
                self._sites.append(Site(Stage.LLM_LAYER, self.llm_layer))
        return self._sites

    def signals(self, site: Site):
        if site.stage is Stage.LLM_LAYER:  # the relay's per-head row, renormalised over the visual tokens
            return Signals(rows=(AttentionRows("last", "all"),), values=True)
        return Signals(rows=(AttentionRows(self._relay.query, "mean"),),
                       values=self.value_norm_term or self._semantic)

    # --- per layer ---------------------------------------------------------------------------------------
    def prune(self, ctx: PruneContext) -> Keep | None:
        if ctx.stage is Stage.LLM_LAYER:
            return self.prune_llm(ctx)
        if ctx.layer == self.sites()[0].layer:
            self._cumulative, self._pending, self._tokens_key = None, [], None  # a new pass through the encoder
        lengths, live, target, excess = self.current_tokens(ctx)
        if not bool(excess.any()):
            return None
        # Step 1 is recorded now and scored later: the live set cannot change before the next cut, so the
        # layers between two cuts are scored in one stacked call (issue 24: per-layer small ops dominated).
        layer = self.layer_signals(ctx)
        self._pending.append(layer)
        if not self.prunes_at(ctx.layer):
            return None
        dropped = self.prune_counts(layer.attention.float(), live, excess, self._final - ctx.layer)
        if not bool(dropped.any()):
            return None  # P = 0 everywhere: nothing leaves at this layer
        keep_counts = torch.maximum(lengths - dropped, target)
        indices = select_top(self.cumulative(live), live, keep_counts)
        self._cumulative = gather_rows(self._cumulative, indices)
        return Keep(indices)

    def current_tokens(self, ctx: PruneContext) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Lengths (U,), live mask (U, N), per-unit target (U,) and excess N - T >= 0 (U,); computed once per
        live set (they change only at a cut)."""
        key = (ctx.tokens.shape[1], tuple(ctx.lengths.tolist()))
        if self._tokens_key != key:
            lengths = ctx.lengths.to(ctx.tokens.device)
            live = torch.arange(ctx.tokens.shape[1], device=lengths.device)[None] < lengths[:, None]
            target = torch.tensor([self.unit_target(ctx, u, n) for u, n in enumerate(key[1])], device=lengths.device)
            self._tokens_key, self._tokens = key, (lengths, live, target, (lengths - target).clamp(min=0))
        return self._tokens

    def unit_target(self, ctx: PruneContext, unit: int, n: int) -> int:
        """The unit's tokens after the encoder stage: the budget's share (one stage), int(T/2) per crop, 2T per image on
        Qwen (the references); a video keeps 2T over its frames before the LLM cut to T, on every family."""
        if self._unit_target is None:
            return ctx.target(unit)
        if ctx.video_frames is not None:
            return min(max(2 * self.budget.tokens // ctx.frames(unit), 1), n)
        return min(self._unit_target, n)

    def layer_signals(self, ctx: PruneContext) -> "LayerSignals":
        """One layer's signals as recorded (views, any dtype): what its score needs."""
        values = relay_value = prefix_values = None
        if self._semantic or self.value_norm_term:
            values = ctx.values()  # (U, H, N, d), zero past each unit's length
            if self._semantic and self._relay.value is not None:
                relay_value, prefix_values = ctx.query_values(self._relay.value), ctx.prefix_values()
        return LayerSignals(ctx.attention(self._relay.query, "mean"), values, relay_value, prefix_values)

    def cumulative(self, live: Tensor) -> Tensor:
        """C over the current tokens (U, N), after folding in the layers scored since the last cut, in layer
        order: C = S at the pass's first layer, then C = w C + (1 - w) S."""
        w = self.history_weight
        for current in self.scores(self._pending, live):
            self._cumulative = current if self._cumulative is None else w * self._cumulative + (1 - w) * current
        self._pending = []
        return self._cumulative

    def scores(self, layers: list["LayerSignals"], live: Tensor):
        """S of each layer (U, N), fp32; layers are stacked into one call, STACK_ELEMENTS values at a time."""
        if not layers:
            return
        per_layer = layers[0].values.numel() if layers[0].values is not None else live.numel()
        step = max(STACK_ELEMENTS // max(per_layer, 1), 1)
        for start in range(0, len(layers), step):
            chunk = layers[start : start + step]
            stacked = LayerSignals(*(None if xs[0] is None else torch.stack(xs).flatten(0, 1).float()
                                     for xs in zip(*chunk)))
            yield from self.score_fn(self.criteria(stacked, live.repeat(len(chunk), 1))).float().unflatten(
                0, (len(chunk), -1))

    def criteria(self, layer: "LayerSignals", live: Tensor) -> ScoreInputs:
        """The three criteria (U, N) of one layer's signals, or of several stacked along the units."""
        semantic = value_norm = None
        if self.value_norm_term:
            value_norm = layer.values.mean(1).abs().sum(-1)
        if layer.relay_value is not None:
            semantic = semantic_attention(layer.relay_value, layer.prefix_values, layer.values, live,
                                          self.semantic_scaled)
        return ScoreInputs(layer.attention if self.attention_term else None, semantic, value_norm, live)

    def prune_llm(self, ctx: PruneContext) -> Keep:
        """Stage 2: each sample's visual tokens cut to exactly T by the last prompt token's view."""
        lengths = ctx.lengths.to(ctx.tokens.device)
        live = torch.arange(ctx.tokens.shape[1], device=lengths.device)[None] < lengths[:, None]
        rows = ctx.attention("last", "all").float()  # (U, H, N): softmax over all keys
        relevance = normalise(rows, live[:, None]).mean(1)  # = softmax over the visual keys, per head
        values = ctx.values().float()  # (U, Hkv, N, d); GQA's repeated heads average the same
        relay = ctx.query_values("last").float()
        logits = torch.einsum("uhnd,uhd->uhn", values, relay) * values.shape[-1] ** -0.5
        semantic = logits.masked_fill(~live[:, None], float("-inf")).softmax(-1).nan_to_num(0.0).mean(1)
        value_norm = values.mean(1).abs().sum(-1)
        score = (normalise(relevance, live) + normalise(semantic, live)) * value_norm
        target = lengths.clamp(max=self.budget.tokens)
        return Keep(select_top(score, live, target))

    def prune_counts(self, attention: Tensor, live: Tensor, excess: Tensor, rpl: int) -> Tensor:
        """P per unit: tokens to drop at this layer (before the max with the target); ``excess`` = N - T."""
        if rpl == 0:
            return excess  # the forced final cut
        dropped_max, excess = excess, excess.float()
        if self.schedule == "uniform":
            raw = excess / (rpl // self.interval + 1)
        else:
            raw = adaptive_count(attention, live, excess, rpl, self.entropy_exponent)
        if self.batch_coupled:
            raw = raw.max().expand_as(raw)
        return torch.round(raw).clamp(min=0).long().minimum(dropped_max)

    def params(self):
        return {
            **super().params(), "relay": self.relay_name, "score": self.score_name,
            "attention_term": self.attention_term, "semantic_term": self.semantic_term,
            "value_norm_term": self.value_norm_term, "semantic_scaled": self.semantic_scaled,
            "history_weight": self.history_weight, "schedule": self.schedule, "interval": self.interval,
            "final_layer": self.final_layer, "entropy_exponent": self.entropy_exponent,
            "batch_coupled": self.batch_coupled, "llm_stage": self.llm_stage, "llm_layer": self.llm_layer,
        }


def semantic_attention(relay_value: Tensor, prefix_values: Tensor, values: Tensor, live: Tensor,
                       scaled: bool) -> Tensor:
    """Head-mean softmax of relay_value . v_j over prefix (CLS) and live patches; the patch part (U, N)."""
    logits = torch.einsum("uhnd,uhd->uhn", values, relay_value)
    prefix = torch.einsum("uhpd,uhd->uhp", prefix_values, relay_value)
    if scaled:
        scale = values.shape[-1] ** -0.5
        logits, prefix = logits * scale, prefix * scale
    logits = logits.masked_fill(~live[:, None], float("-inf"))
    probs = torch.cat([prefix, logits], -1).softmax(-1)[..., prefix.shape[-1]:]
    return probs.mean(1)


def adaptive_count(attention: Tensor, live: Tensor, excess: Tensor, rpl: int, exponent: float) -> Tensor:
    """(N - T) / sqrt(rpl) * (1 - rho^e), rho = entropy(a / sum a) / ln N over each unit's live tokens.

    0 log 0 = 0 (the reference crashes on exact zeros); a unit whose attention is all zero counts as
    uniform (rho = 1: drop nothing early).
    """
    p = normalise(attention, live)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    n = live.sum(-1).float()
    rho = entropy / torch.log(n).clamp(min=1e-12)
    rho = torch.where(p.sum(-1) > 0, rho, torch.ones_like(rho))
    return excess / math.sqrt(rpl) * (1 - rho.clamp(0, 1) ** exponent)

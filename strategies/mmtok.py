"""mmtok: multimodal coverage maximisation (MMTok, ICLR'26; docs/strategies/mmtok.md).

Per image (LLaVA-NeXT: per crop; the keywords are shared by an image's crops), before the language model:

  1. spaces    v  = the projected tokens (the LLM's input space)                 text–vision term
               v′ = the feature layer's patch states (LLaVA: layer −2, before the projector)   vision–vision term
               t  = input-embedding rows of the instruction's keywords: the benchmark post-prompt deleted, words
                    by \\b\\w+\\b, stop words dropped, tokenized as pre-split words, a leading BOS dropped
               (Qwen: t = embeddings of "Question: " + the instruction, unfiltered). All unit-normalised, fp32
  2. coverage  P = softmax(t·vᵀ / τ_t, over tokens) / m       Q = softmax(v′·v′ᵀ / τ_v, over tokens) / n
               C = [P ; α·Q]       f(S) = Σ_rows max_{s∈S} C[row, s]   (facility location, submodular)
  3. greedy    k times: gain[c] = Σ_rows max(C[row, c] − best[row], 0); pick argmax (ties: lowest index);
               best ← max(best, C[:, pick]); excluded and picked columns get −∞
  4. keep      the k picks in original order (compact positions)

τ_t = 0.02 (Qwen: 0.01), τ_v = 0.2, α = 0.5. The official loop, once every gain is −∞ (padding excluded),
picks index 0 again; `greedy_coverage` stops there (its `parity=True` is the official loop; padding exclusion is not
offered here, llava-hf's processor has no letterbox, so the strategy has no parity knob).
"""
from __future__ import annotations

import re

import torch
from torch import Tensor
from torch.nn.functional import normalize

from prunekit.ops import without_post_prompts
from prunekit.pruner import Keep, PruneContext, Site, Stage, TokenPruner
from prunekit.registry import register_strategy
from prunekit.signals import Signals

STOP_WORDS = frozenset(  # the reference's 47 words, lower case
    "a an the is are was were be been being have has had do does did it they he she we you i "
    "what where when why how who which and or but so if then question answer "
    "to for with by from at into onto upon".split())
FALLBACK = "What do you see in this image?"


@register_strategy("mmtok")
class MMTok(TokenPruner):
    image_newlines = "drop"  # LLaVA-NeXT: the reference's layout has no row newlines

    def __init__(
        self,
        budget: int = 64,  # k per image entering the LLM (n_in); LLaVA-NeXT: k // 5 per crop
        tau_t: float | None = None,  # text–vision temperature; None = 0.02, or 0.01 on Qwen
        tau_v: float = 0.2,  # vision–vision temperature
        alpha: float = 0.5,  # weight of the vision–vision coverage
        keyword_filter: bool | None = None,  # None = True on LLaVA, False on Qwen ("Question: " + text)
        positions: str = "compact",
    ):
        super().__init__(budget, "n_in")
        for name, value in (("tau_t", tau_t), ("tau_v", tau_v)):
            if value is not None and value <= 0:
                raise ValueError(f"mmtok: {name} is a softmax temperature > 0, got {value}")
        if alpha < 0:
            raise ValueError(f"mmtok: alpha weighs the vision coverage, >= 0, got {alpha}")
        self.tau_t_given, self.tau_v, self.alpha = tau_t, tau_v, alpha
        self.filter_given = keyword_filter
        self.position_policy = positions
        self.qwen = False
        self._patches: list[Tensor] = []

    @property
    def tau_t(self) -> float:
        return self.tau_t_given if self.tau_t_given is not None else (0.01 if self.qwen else 0.02)

    @property
    def keyword_filter(self) -> bool:
        return self.filter_given if self.filter_given is not None else not self.qwen

    def bind(self, adapter) -> None:
        self.qwen = adapter.vision_prefix_tokens == 0  # Qwen2-VL / 2.5-VL: the reference's Qwen settings

    def sites(self):
        return [Site(Stage.VISION_OUTPUT), Site(Stage.PROJECTOR_OUTPUT)]

    def signals(self, site: Site):
        return Signals(instruction=True) if site.stage is Stage.PROJECTOR_OUTPUT else None

    def prune(self, ctx: PruneContext) -> Keep | None:
        if ctx.stage is Stage.VISION_OUTPUT:  # observe only: v′ per unit, with each token's grid position
            self._patches = [(ctx.tokens[u, : int(ctx.lengths[u])], ctx.grid_positions(u)) for u in range(ctx.num_units)]
            return None
        keep = []
        for u in range(ctx.num_units):
            n = int(ctx.lengths[u])
            patches = aligned(*self._patches[u], ctx.grid_positions(u))
            text = self.text_embeddings(ctx, u)
            coverage = coverage_matrix(text, ctx.tokens[u, :n], patches, self.tau_t, self.tau_v, self.alpha)
            keep.append(greedy_coverage(coverage, ctx.target(u)).sort().values)
        self._patches = []
        return Keep(keep)

    def text_embeddings(self, ctx: PruneContext, unit: int) -> Tensor:
        instruction = ctx.instruction(unit)
        if self.keyword_filter:
            ids = instruction.encode_words(keywords(instruction.text).split())
            if len(ids) >= 2 and instruction.bos is not None and int(ids[0]) == instruction.bos:
                ids = ids[1:]  # a leading BOS is dropped; a lone BOS (no keyword survived) is kept
        else:
            ids = instruction.encode("Question: " + instruction.text)
        return instruction.embed(ids)

    def params(self):
        return {**super().params(), "tau_t": self.tau_t, "tau_v": self.tau_v, "alpha": self.alpha,
                "keyword_filter": self.keyword_filter}


def keywords(text: str) -> str:
    """The reference's keyword filter: post-prompts deleted, words by ``\\b\\w+\\b``, stop words dropped, joined by
    single spaces; the text unchanged when no word survives. A prompt without its question falls back to
    "What do you see in this image?"."""
    stripped = without_post_prompts(text.strip() or FALLBACK)
    words = [w for w in re.findall(r"\b\w+\b", stripped) if w.lower() not in STOP_WORDS]
    return " ".join(words) if words else stripped


def aligned(patches: Tensor, positions: Tensor, target: Tensor) -> Tensor:
    """``patches`` (observed with grid ``positions``) in the order of the ``target`` positions (the projected tokens;
    Qwen2.5-VL's encoder lists groups by window, its merger output in raster order)."""
    if len(positions) != len(target):
        raise ValueError(f"mmtok saw {len(positions)} patches before the projector and {len(target)} tokens after it")
    if torch.equal(positions, target):
        return patches
    where = {tuple(p): i for i, p in enumerate(positions.tolist())}
    missing = [tuple(p) for p in target.tolist() if tuple(p) not in where]
    if missing:
        raise ValueError(f"mmtok: projected tokens at grid positions {missing[:4]} have no patch state before the "
                         "projector; the two sites do not see the same tokens")
    return patches[torch.tensor([where[tuple(p)] for p in target.tolist()], device=patches.device)]


def coverage_matrix(text: Tensor, projected: Tensor, patches: Tensor, tau_t: float, tau_v: float,
                    alpha: float) -> Tensor:
    """C = [P ; α·Q] ((m + n), n): P the text rows over the projected tokens, Q the patch rows over the patches."""
    t, v, w = (normalize(x.float(), dim=-1, eps=1e-8) for x in (text, projected, patches))
    p = torch.softmax(t @ v.T / tau_t, dim=-1) / len(t)
    q = torch.softmax(w @ w.T / tau_v, dim=-1) / len(w)
    return torch.cat([p, alpha * q])


def greedy_coverage(coverage: Tensor, k: int, excluded: Tensor | None = None, parity: bool = False) -> Tensor:
    """Greedy facility location: k columns of ``coverage`` in pick order (ties: lowest index). Excluded columns are
    never picked; the fixed loop stops when every gain is −∞ (all picked or excluded), the official one
    (``parity``) goes on picking argmax = 0."""
    n = coverage.shape[1]
    best = coverage.new_zeros(coverage.shape[0])
    mask = coverage.new_zeros(n)
    if excluded is not None:
        mask[excluded] = float("-inf")
    picks = []
    for _ in range(min(k, n)):
        gain = (coverage - best[:, None]).clamp_min(0).sum(0) + mask
        j = int(gain.argmax())
        if not parity and gain[j] == float("-inf"):
            break
        picks.append(j)
        best = torch.maximum(best, coverage[:, j])
        mask[j] = float("-inf")
    return torch.tensor(picks, dtype=torch.long, device=coverage.device)

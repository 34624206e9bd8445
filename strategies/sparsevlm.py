"""sparsevlm: text-guided progressive pruning inside the LLM (SparseVLM, ICML'25; docs/strategies/sparsevlm.md).

Three code generations share the name; ``version`` picks one (layers are the reference's: layer l's
*output* is pruned, i.e. prunekit's site ``llm_layer[l+1]``, scored by layer l's own attention):

  version  layers         tokens kept at a layer with n visual tokens      recycling  heads             positions
  v1       2, 6, 15, 19   min(int(rank(P)·scale + bias), n−1); skip if rank = n   yes  mean of all       compact
  v1.5     2, 6, 15       min(table[budget][i], n−1)                        yes       mean of all       compact
  v2       2, 6, 15       min(table_v2[budget][i], n−1)                     no        top 14, gravity   original

Per sample, once, on the language model's input embeddings:
  1. raters   V: visual embeddings (N×d), T: every text token after the image (M×d)
              r = mean over the N rows of softmax_text(V·Tᵀ);  raters = {t : r_t > mean(r)}   (code ">", paper "≥")
At each pruning layer l:
  2. score    A = layer l's attention probabilities of the rater rows over all keys, read at the visual tokens
              v2: A ← A / G, G the RoPE-only score of all-ones q and k (attention gravity), then only the
                  top_heads heads with the most rater→visual mass
              p_j = mean over those heads and the raters of A[·, r, j]
  3. keep     the top-k visual tokens by p (ties: lower index), in original order
  4. recycle  (v1, v1.5) of the n−k deleted tokens, the int(0.3·(n−k)) + 1 with the highest p are clustered
              (DPC-kNN, int(n_rec/10) + 1 clusters) and each cluster's mean is placed after the kept tokens
"""
from __future__ import annotations

import torch
from torch import Tensor

from prunekit.pruner import Keep, PruneContext, Site, Stage, TokenPruner
from prunekit.registry import register_strategy
from prunekit.signals import AttentionRows, Signals
from prunekit.budget import layer_average, layer_average_out

from prunekit.ops import select_top

VERSIONS = ("v1", "v1.5", "v2")
CONVENTIONS = ("n_avg_out", "n_avg", "n_final")
REFERENCE_TOKENS = 576  # LLaVA-1.5: the tables below are counts out of 576 image tokens
REFERENCE_DEPTH = 32
LAYERS = {"v1": [2, 6, 15, 19], "v1.5": [2, 6, 15], "v2": [2, 6, 15]}
# tokens kept at the pruning layers, keyed by the budget (RETAIN_TOKN) [SVLM-MAIN score.py; docs/strategies/sparsevlm.md]
TABLES = {
    "v1.5": {192: [300, 200, 110], 128: [303, 110, 36], 96: [238, 48, 26], 64: [66, 30, 17]},
    "v2": {192: [300, 200, 118], 128: [238, 108, 60], 96: [246, 54, 28], 64: [66, 34, 20]},
}
V1_SCALE_BIAS = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}  # [SVLM-V1 scripts]
GRAVITY_EPS = 1e-6


@register_strategy("sparsevlm")
class SparseVLM(TokenPruner):
    def __init__(
        self,
        version: str = "v1.5",  # v1 (rank-adaptive) | v1.5 (fixed schedule + recycling) | v2 ("SparseVLM+")
        budget: int | None = 192,  # visual tokens under `convention`: 192/128/96/64 select the reference tables
        convention: str = "n_avg_out",  # n_avg_out: the maintainers' logger | n_avg: input counts | n_final
        layers: list[int] | None = None,  # pruning layers (output pruned); None = the version's, scaled to depth if needed
        keep_list: list[int] | None = None,  # explicit tokens kept per pruning layer (v1.5 / v2); overrides budget
        scale: float | None = None,  # v1: k = int(rank·scale + bias); None = the reference script for the budget
        bias: float | None = None,
        recycle: bool | None = None,  # token recycling; None = the version's (v1, v1.5: on; v2: off)
        recycle_ratio: float = 0.3,  # τ: share of the deleted tokens recycled (int(τ·n_del) + 1)
        tokens_per_cluster: int = 10,  # clusters = int(n_rec / tokens_per_cluster) + 1
        merge: str = "mean",  # mean (code) | sum (paper §3.3: members summed)
        assign: str = "euclidean",  # euclidean (code) | cosine (paper §3.3): nearest cluster centre
        rater_rule: str = "gt",  # gt: r_t > mean(r) (code) | ge: r_t >= mean(r) (paper)
        gravity: bool | None = None,  # divide by the RoPE gravity G; None = the version's (v2 only)
        gravity_parity: bool = False,  # True: divide by G as is (it can be ~0 or negative); False: by max(|G|, eps)
        top_heads: int | None = None,  # heads averaged, by rater→visual mass; None = the version's (v2: 14; else all)
        positions: str | None = None,  # None = the version's (v1, v1.5: compact; v2: original)
    ):
        if version not in VERSIONS:
            raise ValueError(f"unknown sparsevlm version {version!r}; choose one of {VERSIONS}")
        if convention not in CONVENTIONS:
            raise ValueError(f"sparsevlm budgets use convention {' | '.join(CONVENTIONS)}, got {convention!r}")
        super().__init__(budget, convention)
        for name, value, allowed in (("merge", merge, ("mean", "sum")), ("assign", assign, ("euclidean", "cosine")),
                                     ("rater_rule", rater_rule, ("gt", "ge"))):
            if value not in allowed:
                raise ValueError(f"unknown sparsevlm {name} {value!r}; choose one of {allowed}")
        if not 0.0 <= recycle_ratio <= 1.0 or tokens_per_cluster < 1:
            raise ValueError("recycle_ratio must be in [0, 1] and tokens_per_cluster >= 1")
        if version == "v1":
            if keep_list is not None:
                raise ValueError("keep_list is a v1.5 / v2 knob; v1 derives its counts from the rank (scale, bias)")
            if scale is None:
                if budget not in V1_SCALE_BIAS:
                    raise ValueError(f"sparsevlm v1 keeps int(rank·scale + bias) tokens, data-dependent; the reference "
                                     f"scripts give scale/bias for budgets {sorted(V1_SCALE_BIAS)}: pick one or set scale= "
                                     "(and bias=)")
                scale, bias = V1_SCALE_BIAS[budget]
            bias = 0.0 if bias is None else bias
        elif scale is not None or bias is not None:
            raise ValueError("scale / bias are v1 knobs (rank-adaptive counts); v1.5 and v2 use fixed schedules")
        if keep_list is None and budget is None and version != "v1":
            raise ValueError("sparsevlm needs a budget (192/128/96/64 are the reference schedules) or a keep_list")
        if top_heads is not None and top_heads < 1:
            raise ValueError(f"top_heads must be >= 1, got {top_heads}")
        self.version, self.layers, self.keep_list = version, None if layers is None else [int(x) for x in layers], keep_list
        self.budget_is_target = version != "v1" and keep_list is None  # else the budget only labels the run
        self.scale, self.bias = scale, bias
        self.recycle = version != "v2" if recycle is None else recycle
        self.recycle_ratio, self.tokens_per_cluster, self.merge, self.assign = recycle_ratio, tokens_per_cluster, merge, assign
        self.rater_rule = rater_rule
        self.gravity = version == "v2" if gravity is None else gravity
        self.gravity_parity = gravity_parity
        self.top_heads = (14 if version == "v2" else None) if top_heads is None else top_heads
        self.position_policy = positions or ("original" if version == "v2" else "compact")
        self._layers = self.layers
        self._schedule: dict[int, list[int]] = {}  # per visual-token count entering the LLM: tokens kept per layer
        self._raters: dict[int, Tensor] = {}  # per sample of the current prefill: rater mask over its text tokens
        self._n_in: dict[int, int] = {}  # per sample: visual tokens entering the LLM

    # --- where ----------------------------------------------------------------------------------------
    def bind(self, adapter) -> None:
        depth = adapter.num_llm_layers
        layers = self.layers or default_layers(self.version, depth)
        if layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] > depth - 2:
            raise ValueError(f"sparsevlm layers {layers} must be increasing in 0..{depth - 2} (the output of layer l is "
                             f"pruned before layer l+1; the language model has {depth} layers)")
        if self.keep_list is not None and len(self.keep_list) != len(layers):
            raise ValueError(f"keep_list has {len(self.keep_list)} counts for {len(layers)} pruning layers {layers}")
        self._layers, self._schedule = layers, {}
        if adapter.tokens_per_image() is not None and self.version != "v1":  # unreachable budgets fail at attach
            self.schedule(adapter.tokens_per_image(), depth)

    def sites(self):
        if self._layers is None:
            raise RuntimeError("sparsevlm's layers depend on the model depth: attach() binds them (or pass layers=)")
        return [Site(Stage.LLM_LAYER, layer + 1) for layer in self._layers]

    def signals(self, site: Site):
        rows = AttentionRows("text", "all" if self.gravity or self.top_heads else "mean")
        return Signals(rows=(rows,), prompt=site.layer == self._layers[0] + 1)

    # --- per pruning layer ------------------------------------------------------------------------------
    def prune(self, ctx: PruneContext) -> Keep | None:
        stage = self._layers.index(ctx.layer - 1)
        if stage == 0:  # a new prefill: choose the raters of each sample from its input embeddings
            self._raters = dict(zip(ctx.sample_of, choose_raters(ctx.prompt_embeddings(), self.rater_rule)))
            self._n_in = {b: int(n) for b, n in zip(ctx.sample_of, ctx.lengths)}
        raters = torch.stack([pad(self._raters[b], ctx.text_queries().shape[1]) for b in ctx.sample_of])
        scores, rows = self.score(ctx, raters.to(ctx.tokens.device))
        live = torch.arange(scores.shape[1], device=scores.device)[None] < ctx.lengths.to(scores.device)[:, None]
        counts = [self.keep_count(stage, int(n), rows[u, raters[u], : int(n)], self._n_in[b], ctx.num_layers)
                  for u, (b, n) in enumerate(zip(ctx.sample_of, ctx.lengths))]
        kept = select_top(scores, live, torch.tensor([int(n) if k is None else k for k, n in zip(counts, ctx.lengths)]))
        if not self.recycle:
            return Keep(kept)
        return self.recycled(ctx, kept, scores, counts)

    def score(self, ctx: PruneContext, raters: Tensor) -> tuple[Tensor, Tensor]:
        """p (U, N): rater→visual attention averaged over (chosen) heads and raters; and the head-mean rater rows
        (U, R, N) (rows of non-raters zero) for v1's rank."""
        weight = raters.float()
        if not (self.gravity or self.top_heads):
            rows = ctx.attention("text", "mean").float() * weight[..., None]
            return rows.sum(1) / weight.sum(1, keepdim=True).clamp(min=1), rows
        attn = ctx.attention("text", "all").float()  # (U, H, R, N)
        if self.gravity:
            g = ctx.rope_gravity().float()[:, None]
            g = g if self.gravity_parity else g.abs().clamp(min=GRAVITY_EPS)
            attn = torch.nan_to_num(attn / g, nan=0.0, posinf=0.0, neginf=0.0) * (attn != 0)  # padded entries stay 0
        attn = attn * weight[:, None, :, None]
        if self.top_heads is not None and self.top_heads < attn.shape[1]:
            heads = attn.sum((2, 3)).topk(self.top_heads, dim=1).indices  # (U, top): most rater→visual mass
            attn = attn.gather(1, heads[..., None, None].expand(-1, -1, *attn.shape[2:]))
        rows = attn.mean(1)
        return rows.sum(1) / weight.sum(1, keepdim=True).clamp(min=1), rows

    def keep_count(self, stage: int, n: int, rows: Tensor, n_in: int, depth: int) -> int | None:
        """Tokens kept of n at this layer; None: this sample skips the layer (v1, full rank). ``rows``: the
        head-mean rater→visual attention P (raters × n)."""
        if self.version == "v1":
            rank = int(torch.linalg.matrix_rank(rows))  # fp32, as the reference
            if n - rank == 0:
                return None
            return max(min(int(rank * self.scale + self.bias), n - 1), 0)
        return max(min(self.schedule(n_in, depth)[stage], n - 1), 0)

    def recycled(self, ctx: PruneContext, kept: list[Tensor], scores: Tensor, counts: list[int | None]) -> Keep:
        """Keep plus the merged recycled tokens, placed after the kept ones (sequence order) [SVLM-MAIN]."""
        indices, features, members, order = [], [], [], []
        for u, idx in enumerate(kept):
            n = int(ctx.lengths[u])
            tokens = ctx.tokens[u, :n].float()
            deleted = torch.ones(n, dtype=torch.bool, device=idx.device)
            deleted[idx] = False
            deleted = deleted.nonzero().squeeze(1)
            merged, groups, reps = tokens.new_zeros(0, tokens.shape[1]), [], idx.new_zeros(0)
            if counts[u] is not None and len(deleted):
                n_rec = min(int(self.recycle_ratio * len(deleted)) + 1, len(deleted))
                chosen = deleted[scores[u, deleted].topk(n_rec).indices]  # by score, descending (reference order)
                noise = torch.rand(n_rec, generator=ctx.generator(u)).to(tokens.device) * 1e-6
                centres, assignment = dpc_knn(tokens[chosen], n_rec // self.tokens_per_cluster + 1, noise, self.assign)
                merged = merge_clusters(tokens[chosen], assignment, len(centres), self.merge)
                groups = [chosen[assignment == c] for c in range(len(centres))]
                reps = chosen[centres]  # a cluster's representative: its centre
            indices.append(torch.cat([idx, reps]))
            features.append(torch.cat([tokens[idx], merged]))
            members.append([i.view(1) for i in idx] + groups)
            order.append(torch.cat([idx, n + torch.arange(len(reps), device=idx.device)]))
        return Keep(indices, features, members, order=order)

    # --- schedules ------------------------------------------------------------------------------------
    def schedule(self, n: int, depth: int) -> list[int]:
        """Tokens kept at each pruning layer for a sample with n visual tokens entering the LLM (v1.5 / v2)."""
        if n not in self._schedule:
            self._schedule[n] = self._derive(n, depth)
        return self._schedule[n]

    def _derive(self, n: int, depth: int) -> list[int]:
        if self.keep_list is not None:
            return [int(k) for k in self.keep_list]
        table, target, convention = TABLES[self.version], self.budget.tokens, self.budget.convention
        reference = n == REFERENCE_TOKENS and self._layers == LAYERS[self.version] and convention == "n_avg_out"
        if reference and target in table:
            return list(table[target])  # the maintainers' schedule, verbatim
        # prunekit's extension: the nearest reference schedule (by kept share) scaled by the largest α that meets
        # the target under the budget's convention
        base = table[min(table, key=lambda key: abs(key / REFERENCE_TOKENS - target / n))]

        def counts(alpha: float) -> list[int]:
            return [int(alpha * c * n / REFERENCE_TOKENS) for c in base]

        def measure(alpha: float) -> float:
            per_layer = simulate(n, self._layers, counts(alpha), depth, self.recycle, self.recycle_ratio,
                                 self.tokens_per_cluster)
            return {"n_avg_out": layer_average_out, "n_avg": layer_average, "n_final": lambda c: c[-1]}[convention](per_layer)

        lo, hi = 0.0, REFERENCE_TOKENS / min(base)  # hi: every count >= n, nothing pruned
        if measure(lo) > target:
            raise ValueError(
                f"sparsevlm cannot reach {target} visual tokens ({convention}) with {n} image tokens on {depth} layers "
                f"and pruning layers {self._layers}: even the smallest schedule gives {measure(lo):g} (layers up to "
                f"the first cut see every token{', and recycling adds merged tokens' if self.recycle else ''}). Lower "
                "the first pruning layer, or pick another convention"
            )
        if measure(hi) <= target:
            return counts(hi)
        for _ in range(50):  # measure(lo) <= target < measure(hi)
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if measure(mid) <= target else (lo, mid)
        return counts(lo)

    def params(self):
        return {
            **super().params(), "version": self.version, "layers": self._layers, "keep_list": self.keep_list,
            "scale": self.scale, "bias": self.bias, "recycle": self.recycle, "recycle_ratio": self.recycle_ratio,
            "tokens_per_cluster": self.tokens_per_cluster, "merge": self.merge, "assign": self.assign,
            "rater_rule": self.rater_rule, "gravity": self.gravity, "gravity_parity": self.gravity_parity,
            "top_heads": self.top_heads,
        }


def default_layers(version: str, depth: int) -> list[int]:
    """The version's pruning layers; on a model too shallow for them, the same fractions of its depth."""
    layers = LAYERS[version]
    if layers[-1] <= depth - 2:
        return list(layers)
    scaled = sorted({min(round(layer * depth / REFERENCE_DEPTH), depth - 2) for layer in layers})
    return [layer for layer in scaled if layer >= 0]


def simulate(n: int, layers: list[int], keeps: list[int], depth: int, recycle: bool, recycle_ratio: float = 0.3,
             tokens_per_cluster: int = 10) -> list[int]:
    """Visual tokens each LLM layer takes as input under a fixed schedule (docs/strategies/sparsevlm.md): at pruning layer l
    min(keep, n−1) survive, plus int(n_rec / 10) + 1 merged tokens with recycling."""
    cuts, current, per_layer = dict(zip((layer + 1 for layer in layers), keeps)), n, []
    for layer in range(depth):
        if layer in cuts and current > 0:
            kept = max(min(cuts[layer], current - 1), 0)
            deleted = current - kept
            n_rec = min(int(recycle_ratio * deleted) + 1, deleted)
            current = kept + (n_rec // tokens_per_cluster + 1 if recycle and deleted else 0)
        per_layer.append(current)
    return per_layer


def choose_raters(prompt, rule: str = "gt") -> list[Tensor]:
    """Per unit, the rater mask over its text tokens (docs/strategies/sparsevlm.md), from the input embeddings in fp32.

    r = mean over the visual rows of softmax over the text axis of V·Tᵀ; raters: r_t > mean(r) (``ge``: >=).
    All r equal (e.g. one text token) would leave no rater under ">": then every text token rates.
    """
    out = []
    for u in range(prompt.image.shape[0]):
        v = prompt.image[u, prompt.image_valid[u]].float()
        t = prompt.text[u, prompt.text_valid[u]].float()
        if len(t) == 0 or len(v) == 0:
            out.append(torch.zeros(len(t), dtype=torch.bool))
            continue
        r = (v @ t.T).softmax(1).mean(0)
        raters = r > r.mean() if rule == "gt" else r >= r.mean()
        out.append((raters if raters.any() else torch.ones_like(raters)).cpu())
    return out


def pad(mask: Tensor, length: int) -> Tensor:
    return torch.cat([mask, mask.new_zeros(length - len(mask))])


def dpc_knn(x: Tensor, clusters: int, noise: Tensor, assign: str = "euclidean") -> tuple[Tensor, Tensor]:
    """Density-peak clustering with k-nearest-neighbour density (SparseVLM's ``cluster_and_merge``).

    Distances are Euclidean / √d. ρ_i = exp(−mean squared distance to its ``clusters`` nearest tokens, itself
    included) + noise; δ_i = distance to the nearest token of higher ρ (the largest distance for the densest);
    centres: the ``clusters`` largest ρ·δ, in that order. Every token joins its nearest centre (Euclidean, or
    the most cosine-similar with ``assign="cosine"``); a centre always joins itself.
    Returns (centre indices (C,), assignment (n,) in 0..C−1).
    """
    n, dim = x.shape
    clusters = min(clusters, n)
    dist = torch.cdist(x[None], x[None])[0] / dim**0.5
    density = (-(dist.topk(clusters, dim=-1, largest=False).values ** 2).mean(-1)).exp() + noise.to(x.dtype)
    higher = density[None, :] > density[:, None]
    parent = torch.where(higher, dist, dist.max()).min(-1).values
    centres = (parent * density).topk(clusters).indices
    if assign == "euclidean":
        assignment = dist[centres].argmin(0)
    else:
        unit = torch.nn.functional.normalize(x, dim=-1)
        assignment = (unit[centres] @ unit.T).argmax(0)
    assignment[centres] = torch.arange(clusters, device=x.device)
    return centres, assignment


def merge_clusters(x: Tensor, assignment: Tensor, clusters: int, merge: str = "mean") -> Tensor:
    """(C, D): each cluster's members averaged (as the code: sum / (count + 1e-6)) or summed (paper)."""
    total = x.new_zeros(clusters, x.shape[1]).index_add_(0, assignment, x)
    if merge == "sum":
        return total
    count = torch.bincount(assignment, minlength=clusters).to(x.dtype)
    return total / (count[:, None] + 1e-6)

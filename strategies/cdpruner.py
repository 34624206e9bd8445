"""cdpruner: a conditional DPP over the projected tokens (CDPruner, NeurIPS'25; docs/strategies/cdpruner.md).

Per image (LLaVA-NeXT: per crop), before the language model:

  1. similarity  S_ij = cos(x_i, x_j) on the projected tokens x (fp32)
  2. relevance   e_i = CLIP visual projection of post_layernorm(layer −2 patch i); u_m = CLIP text embedding of
                 segment m of the instruction (the post-prompt removed; 77-token segments);
                 s_i = mean_m(−cos(e_i, u_m))   (the reference's sign flip: `negate_relevance`)
                 r = (s − min s + 1e−6) / (max s − min s), min and max over every crop of the image
                 (constant s: r ≡ 1); optional r ← exp(θ / (2(1 − θ)) · r) (`theta`, off in the reference)
  3. kernel      L = diag(r) · S · diag(r)
  4. greedy MAP  d²_i = L_ii; T times: j = argmax d² (ties: lowest index); e = (L_j − cᵀc_j) / √d²_j;
                 c ← [c; e]; d² ← d² − e²; d²_j ← −∞   (Chen et al. 2018, incremental Cholesky)
                 past L's numerical rank (best d² ≤ 1e−10) the rest is filled by relevance (the reference
                 takes √ of a non-positive number: NaN; `parity=True`)
  5. keep        the T picks in original order (compact positions)

The text encoder is an auxiliary CLIP the strategy owns (`text_encoder`: a hub id or a local directory of a
CLIPModel checkpoint matching the vision tower), loaded once per path.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn.functional import normalize

from prunekit.ops import without_post_prompts
from prunekit.pruner import Keep, PruneContext, Site, Stage, TokenPruner
from prunekit.registry import register_strategy
from prunekit.signals import Signals

EPSILON = 1e-10  # d² at or below it is past the kernel's numerical rank


@register_strategy("cdpruner")
class CDPruner(TokenPruner):
    image_newlines = "drop"  # LLaVA-NeXT: the reference's layout has no row newlines

    def __init__(
        self,
        budget: int = 64,  # T per image entering the LLM (n_in); LLaVA-NeXT: T // 5 per crop
        text_encoder: str | None = "openai/clip-vit-large-patch14-336",  # the CLIP of LLaVA-1.5's tower (id or dir)
        negate_relevance: bool = True,  # the reference's s = −cos (CLIP towers)
        theta: float | None = None,  # relevance reweighting exp(θ/(2(1−θ))·r); None = off, as released
        parity: bool = False,  # the reference past the numerical rank (NaN) and on constant relevance (0/0)
        positions: str = "compact",
    ):
        super().__init__(budget, "n_in")
        if theta is not None and not 0.0 <= theta < 1.0:
            raise ValueError(f"cdpruner: theta is in [0, 1), got {theta}")
        self.text_encoder, self.negate_relevance, self.theta, self.parity = text_encoder, negate_relevance, theta, parity
        self.position_policy = positions
        self._encoder = None
        self._patches: list[Tensor] = []

    def supports(self, adapter) -> str | None:
        if adapter.vision_prefix_tokens < 1 or not adapter.clip_tower:
            return ("CDPruner's relevance needs a CLIP vision tower and its CLIP text encoder; this ViT has neither, "
                    "and the authors released no procedure for it (CDPruner#4)")
        if self.text_encoder is None:
            return ("CDPruner's relevance needs the CLIP text encoder of this model's vision tower, and none is "
                    "configured (the pocket model's tower was trained from scratch: it has none); pass "
                    "text_encoder=<hub id or local dir of a CLIPModel checkpoint matching the tower>")
        return None

    def bind(self, adapter) -> None:
        if self.supports(adapter) is not None:
            return  # attach refuses with the reason; nothing to load
        if self._encoder is None or self._encoder.path != self.text_encoder:
            self._encoder = adapter.clip_text_encoder(self.text_encoder, "cdpruner")  # loaded once per path

    def sites(self):
        return [Site(Stage.VISION_OUTPUT), Site(Stage.PROJECTOR_OUTPUT)]

    def signals(self, site: Site):
        return Signals(instruction=True) if site.stage is Stage.PROJECTOR_OUTPUT else None

    def prune(self, ctx: PruneContext) -> Keep | None:
        if ctx.stage is Stage.VISION_OUTPUT:  # observe only: the layer −2 patches, for the relevance
            self._patches = [ctx.tokens[u, : int(ctx.lengths[u])] for u in range(ctx.num_units)]
            return None
        units = range(ctx.num_units)
        images = [ctx.instruction(u).image for u in units]
        texts: dict[str, Tensor] = {}  # one text encoding per instruction (an image's crops share it)
        scores = [self.relevance_scores(ctx, u, texts) for u in units]
        relevance = [None] * ctx.num_units
        for image in set(images):  # min-max over every crop of one image, never across images
            mine = [u for u in units if images[u] == image]
            normed = min_max(torch.cat([scores[u] for u in mine]), self.parity)
            for u, part in zip(mine, normed.split([len(scores[u]) for u in mine])):
                relevance[u] = part if self.theta is None else torch.exp(self.theta / (2 * (1 - self.theta)) * part)
        keep = []
        for u in units:
            n = int(ctx.lengths[u])
            keep.append(greedy_map(kernel(ctx.tokens[u, :n], relevance[u]), ctx.target(u), relevance[u],
                                   self.parity).sort().values)
        self._patches = []
        return Keep(keep)

    def relevance_scores(self, ctx: PruneContext, unit: int, texts: dict[str, Tensor]) -> Tensor:
        """s_i = mean over the instruction's segments m of ∓cos(e_i, u_m)."""
        text = question(ctx.instruction(unit).text)
        if text not in texts:
            ids, mask = text_segments(self._encoder.token_ids(text), self._encoder.width)
            texts[text] = normalize(self._encoder.encode(ids, mask), dim=-1)
        image = normalize(self._encoder.project_patches(self._patches[unit]), dim=-1)
        cosine = (image @ texts[text].T).mean(1)
        return (-cosine if self.negate_relevance else cosine).to(ctx.tokens.device)

    def params(self):
        return {**super().params(), "text_encoder": self.text_encoder, "negate_relevance": self.negate_relevance,
                "theta": self.theta, "parity": self.parity}


def question(text: str) -> str:
    """The instruction as the reference's eval scripts pass it: the benchmark post-prompt removed."""
    return without_post_prompts(text)


def text_segments(ids: list[int], width: int = 77) -> tuple[Tensor, Tensor]:
    """The reference's cut of a long text: ceil(L / width) consecutive segments, the last one zero-padded (mask 0),
    each encoded as its own sequence (only the first has BOS, only the last EOS)."""
    count = max(1, math.ceil(len(ids) / width))
    padded = torch.zeros(count * width, dtype=torch.long)
    padded[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    mask = torch.zeros(count * width, dtype=torch.long)
    mask[: len(ids)] = 1
    return padded.view(count, width), mask.view(count, width)


def min_max(scores: Tensor, parity: bool = False) -> Tensor:
    """r = (s − min + 1e−6) / (max − min), the 1e−6 in the numerator only; constant s gives r ≡ 1 (the reference
    divides by zero: ``parity``)."""
    spread = scores.max() - scores.min()
    if not parity and spread < 1e-12:
        return torch.ones_like(scores)
    return (scores - scores.min() + 1e-6) / spread


def kernel(tokens: Tensor, relevance: Tensor) -> Tensor:
    """L = diag(r) · S · diag(r), S the cosine similarity of the tokens (fp32)."""
    unit = normalize(tokens.float(), dim=-1)
    r = relevance.float().to(unit.device)
    return r[:, None] * (unit @ unit.T) * r[None, :]


def greedy_map(L: Tensor, k: int, relevance: Tensor, parity: bool = False) -> Tensor:
    """Fast greedy MAP of the DPP with kernel ``L``: k indices in pick order. Past the numerical rank the rest are
    the most relevant unpicked tokens (``parity``: the reference's √ of a non-positive d², NaN)."""
    n = L.shape[0]
    k = min(k, n)
    d2 = L.diagonal().clone()
    c = L.new_zeros(k, n)
    picks: list[int] = []
    for t in range(k):
        j = int(d2.argmax())
        if not parity and not d2[j] > EPSILON:  # also catches NaN
            rest = relevance.float().to(L.device).clone()
            rest[picks] = float("-inf")
            picks += torch.sort(rest, descending=True, stable=True).indices[: k - t].tolist()
            break
        e = (L[j] - c[:t, j] @ c[:t]) / torch.sqrt(d2[j])
        c[t] = e
        d2 = d2 - e * e
        d2[j] = float("-inf")
        picks.append(j)
    return torch.tensor(picks, dtype=torch.long, device=L.device)

"""The strategy contract: where a pruner acts (sites), what it sees (context), what it returns (Keep)."""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor

from .budget import Budget
from .errors import SignalError


class Stage(str, Enum):
    """The four insertion points every method in the literature uses (docs/architecture.md, Stages)."""

    VISION_LAYER = "vision_layer"  # inside the vision encoder, after layer l
    VISION_OUTPUT = "vision_output"  # vision feature layer, before the projector
    PROJECTOR_OUTPUT = "projector_output"  # projected embeddings, before the language model
    LLM_LAYER = "llm_layer"  # inside the language model, before decoder layer k (prefill only)

    def __str__(self) -> str:
        return self.value


POSITION_POLICIES = ("compact", "original")


class TokenType(IntEnum):
    """Kinds of prompt tokens a language-model-stage strategy sees in ``PruneContext.token_types``."""

    PAD = 0
    SYSTEM = 1  # text before the first image token
    IMAGE = 2
    TEXT = 3  # text after the first image token (the instruction)


@dataclass(frozen=True)
class Site:
    """One place a strategy acts: a stage and, for layer stages, the layer index."""

    stage: Stage
    layer: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "stage", Stage(self.stage))
        if self.stage in (Stage.VISION_LAYER, Stage.LLM_LAYER):
            if not isinstance(self.layer, int) or self.layer < 0:
                raise ValueError(f"stage {self.stage} needs a layer index >= 0, got {self.layer!r}")
        elif self.layer is not None:
            raise ValueError(f"stage {self.stage} takes no layer index, got {self.layer!r}")

    def __str__(self) -> str:
        return f"{self.stage}" if self.layer is None else f"{self.stage}[{self.layer}]"


@dataclass
class Keep:
    """A strategy's decision for one site: per unit (image or sample), which visual tokens survive.

    ``indices[u]`` are indices into the unit's current visual tokens, one per output token; for merged
    tokens it is the representative. ``features[u]`` (optional) replaces the gathered features of the
    output tokens (merging); ``members[u][j]`` lists the current tokens merged into output token j.
    The runtime sorts outputs by representative, so sequence order is always the original order.

    ``mask_only`` (``llm_layer`` sites only; an ablation, e.g. FastV's evaluation path): the dropped tokens
    are not removed but masked out as keys for every later layer, prefill and decode; they are still
    computed, so nothing is saved.

    ``order`` (after the vision encoder: ``vision_output``, ``projector_output``, ``llm_layer``) overrides the
    sequence order: ``order[u][j]`` is a sort key per output
    token (ties broken by representative). The outputs then fill the unit's surviving visual slots in key
    order, so under ``compact`` positions they are numbered in that order (SparseVLM appends its merged tokens
    after the kept ones, VisionZip puts [CLS] first); the trace lists them in sequence order.
    """

    indices: list[Tensor]
    features: list[Tensor] | None = None
    members: list[list[Tensor]] | None = None
    mask_only: bool = False
    order: list[Tensor] | None = None

    @classmethod
    def rows(cls, indices: Tensor | Sequence[Tensor], features=None, members=None, mask_only: bool = False) -> "Keep":
        """Build from a batched (U, K) index tensor (and (U, K, D) features) or per-unit lists."""
        idx = list(indices.unbind(0)) if isinstance(indices, Tensor) else list(indices)
        feats = list(features.unbind(0)) if isinstance(features, Tensor) else features
        return cls(idx, feats, members, mask_only)


@dataclass
class PruneContext:
    """What a strategy sees at one site. It never touches model internals.

    ``tokens`` holds each unit's current visual tokens, right-padded to a common length; ``lengths``
    says how many are live. Units are images at vision stages and samples at ``llm_layer``.
    ``grid_positions(u)`` gives each current token's origin as (image, row, col) in the unpruned patch
    grid (row and col are -1 where the image has no grid), computed on demand. Signals the strategy declared in
    ``signals(site)`` are read with ``attention``, ``keys``, ``values`` and ``query_values``.
    ``token_types`` (``llm_layer`` only) labels each unit's whole current sequence with ``TokenType``.
    """

    site: Site
    tokens: Tensor  # (U, N, D)
    lengths: Tensor  # (U,) long
    grids: list[tuple[int, int] | None]  # per unit: the patch grid if its tokens are still a full raster grid
    sample_of: list[int]  # per unit: index of the sample in the batch
    budget: Budget | None = None
    num_layers: int | None = None  # layers of the module the site is in (vision tower or language model)
    token_types: Tensor | None = None  # (U, L) TokenType of each unit's current sequence (llm_layer)
    signals: Any = field(default=None, repr=False)  # SiteSignals, when the strategy declared any
    budget_units: int = 1  # vision units a per-image budget is split over (LLaVA-NeXT: its most crops)
    video_frames: list[int] | None = None  # per unit: the frames of its video; a per-video budget is split over them
    _prompt_source: Any = field(default=None, repr=False)
    _gravity_source: Any = field(default=None, repr=False)
    _prefix_source: Any = field(default=None, repr=False)
    _instruction_source: Any = field(default=None, repr=False)
    _text_source: Any = field(default=None, repr=False)
    _norm: Any = field(default=None, repr=False)
    _seed_source: Any = field(default=None, repr=False)
    _grid_source: Any = field(default=None, repr=False)

    @property
    def stage(self) -> Stage:
        return self.site.stage

    @property
    def layer(self) -> int | None:
        return self.site.layer

    @property
    def num_units(self) -> int:
        return self.tokens.shape[0]

    def target(self, unit: int) -> int:
        """Tokens to keep for ``unit``: the budget's per-unit target, clamped to what is there. Budgets are per
        image; where an image is several vision units (LLaVA-NeXT's crops) a vision-side target is the budget
        split evenly over the model's most crops (``budget_units``), as the references do, and where a unit is a frame
        the budget is per video, split evenly over its frames."""
        n = int(self.lengths[unit])
        if self.budget is None:
            return n
        if self.stage is Stage.LLM_LAYER:
            return min(self.budget.tokens, n)
        return min(max(self.budget.tokens // self.budget_units // self.frames(unit), 1), n)

    def frames(self, unit: int) -> int:
        """The frames of the video ``unit`` is a frame of (1: an image or a crop) at a vision-side site."""
        return 1 if self.video_frames is None else self.video_frames[unit]

    def seed(self, unit: int) -> int:
        """A seed derived from the unit's image content, identical whatever the batch (invariant 5)."""
        return self._seed_source(unit)

    def generator(self, unit: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed(unit))

    def grid_positions(self, unit: int) -> Tensor:
        """(n, 3) long: image, row, col of each of the unit's current tokens in the unpruned patch grid."""
        return self._grid_source(unit)

    # --- signals (declared in TokenPruner.signals) ---------------------------------------------------
    def attention(self, query: str = "last", heads: str = "mean") -> Tensor:
        """Attention of ``query`` over each unit's visual tokens: (U, N) head-mean or (U, H, N)."""
        return self._signals().attention(query, heads)

    def keys(self) -> Tensor:
        return self._signals().keys()

    def values(self) -> Tensor:
        return self._signals().values()

    def query_values(self, query: str = "first") -> Tensor:
        return self._signals().query_values(query)

    def prefix_values(self) -> Tensor:
        return self._signals().prefix_values()

    def text_queries(self) -> Tensor:
        return self._signals().text_queries()

    def text_keys(self) -> Tensor:
        return self._signals().text_keys()

    def prompt_embeddings(self) -> "PromptEmbeddings":
        """The language model's input embeddings of each unit's visual and text tokens (``Signals(prompt=True)``)."""
        return self._need(self._prompt_source, "prompt embeddings",
                          "Signals(..., prompt=True) in the strategy's signals(site) (llm_layer sites only)")()

    def prefix_tokens(self) -> Tensor:
        """(U, P, D) the vision feature layer's output at the encoder's prefix tokens (CLS), before the projector
        (``Signals(prefix=True)``, ``vision_output`` only)."""
        return self._need(self._prefix_source, "prefix tokens", "Signals(prefix=True) at vision_output")()

    def instruction(self, unit: int) -> "Instruction":
        """The instruction of ``unit``'s sample before the language model runs (``Signals(instruction=True)``,
        pre-LLM sites): its text, its token ids, and the language model's tokenizer and input embeddings."""
        return self._need(self._instruction_source, "instructions",
                          "Signals(instruction=True) at a pre-LLM site (vision_layer, vision_output, projector_output)")(unit)

    def text_tokens(self) -> tuple[Tensor, Tensor]:
        """(U, R, D) hidden states of each unit's text tokens at this ``llm_layer`` site (the rows of
        ``attention('text')``), and their validity (U, R)."""
        return self._need(self._text_source, "text tokens", "an llm_layer site")()

    def output_norm(self, x: Tensor) -> Tensor:
        """The language model's final norm applied to ``x`` (``llm_layer`` sites; DART's similarity space)."""
        return self._need(self._norm, "the output norm", "an llm_layer site")(x)

    def rope_gravity(self) -> Tensor:
        """(U, R, N) the RoPE-only score of the scored layer between each text query (rows as in
        ``attention('text')``) and each visual token: all-ones q and k rotated at their current positions,
        q·k times the layer's scaling (SparseVLM v2's attention-gravity term). ``llm_layer`` sites only."""
        return self._need(self._gravity_source, "the RoPE gravity", "an llm_layer site with attention signals")()

    def _need(self, source, what: str, where: str):
        """``source`` (a runtime-supplied callable), or an error naming what the site lacks."""
        if source is None:
            raise SignalError(f"{what} are not available at {self.site}: they need {where}")
        return source

    def _signals(self):
        if self.signals is None:
            raise SignalError(
                f"no signals were recorded at {self.site}: declare them in the strategy's signals(site), "
                "e.g. return Signals(rows=(AttentionRows('last'),))"
            )
        return self.signals


@dataclass(frozen=True)
class Instruction:
    """One sample's instruction, as a pre-LLM strategy sees it (docs/architecture.md, "Instructions").

    ``text`` is the user's text of the sample's last turn with the images and the chat template removed (LLaVA-1.5:
    "What is ...?\nAnswer the question using a single word or phrase."), or the text given with
    ``handle.instructions([...])``. ``ids`` are its token ids in the language model's vocabulary (no special
    tokens). ``encode(text)`` tokenizes any text the same way; ``encode_words(words)`` tokenizes pre-split words as
    one sequence with the special tokens (``bos`` first where the tokenizer adds one; ``bos`` is None where it adds
    none); ``embed(ids)`` gives rows of the language model's input-embedding table, (m, D) in the model's dtype and
    device. ``image`` numbers the unit's image in the batch: the crops of one LLaVA-NeXT image share it.
    """

    text: str
    ids: Tensor
    image: int
    bos: int | None
    encode: Callable[[str], Tensor] = field(repr=False, compare=False)
    encode_words: Callable[[Sequence[str]], Tensor] = field(repr=False, compare=False)
    embed: Callable[[Tensor], Tensor] = field(repr=False, compare=False)


@dataclass
class PromptEmbeddings:
    """Language-model input embeddings of a unit's tokens as they entered the language model (after any
    pre-LLM pruning): visual (U, N0, D) with ``image_valid`` (U, N0), and text (U, M, D) — the TEXT tokens in
    sequence order, the same rows as ``attention('text')`` — with ``text_valid`` (U, M). Right-padded."""

    image: Tensor
    image_valid: Tensor
    text: Tensor
    text_valid: Tensor


def content_seed(*tensors: Tensor) -> int:
    """A 63-bit seed from the exact bytes of tensors (pixel values are bit-stable across batch sizes)."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def combine_seeds(seeds: Sequence[int]) -> int:
    """One seed from several (a sample with several images)."""
    h = hashlib.blake2b(digest_size=8)
    for s in seeds:
        h.update(int(s).to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little") >> 1


class TokenPruner(ABC):
    """Base class of every strategy.

    A subclass declares its ``sites()`` and implements ``prune(ctx) -> Keep``; it is registered with
    ``@register_strategy("name")``. ``position_policy`` says which positions kept tokens get in the
    language model: ``compact`` (renumbered as if the short sequence had been the prompt) or
    ``original`` (the unpruned positions, with gaps). On M-RoPE models (Qwen2-VL) kept tokens always keep their
    original 3-D positions. ``image_newlines`` (LLaVA-NeXT, after a vision-side cut): ``keep`` the row newline
    tokens of the anyres layout (stock layout, FasterVLM) or ``drop`` them (VisionZip, FlowCut).
    """

    name: ClassVar[str] = "?"  # set by @register_strategy
    position_policy: str = "compact"
    image_newlines: str = "keep"
    budget_is_target: bool = True  # False where the counts come from elsewhere (SparseVLM v1's rank, a keep_list)

    def __init__(self, budget: int | None = None, convention: str = "n_in"):
        self.budget = None if budget is None else Budget(budget, convention)

    @abstractmethod
    def sites(self) -> Sequence[Site]:
        """Where this strategy acts."""

    @abstractmethod
    def prune(self, ctx: PruneContext) -> Keep | None:
        """Decide which visual tokens of each unit survive at ``ctx.site`` (None: nothing changes here)."""

    def bind(self, adapter) -> None:
        """Called at attach, before ``sites()``: resolve model-dependent defaults (e.g. layer counts)."""

    def signals(self, site: Site):
        """The signals (``prunekit.signals.Signals``) needed at ``site``; none by default."""
        return None

    def supports(self, adapter) -> str | None:
        """Return a reason if this strategy cannot run on ``adapter``'s model family, else None."""
        return None

    def params(self) -> dict[str, Any]:
        """The knobs, for logging. Subclasses with more knobs extend it."""
        out: dict[str, Any] = {"name": self.name, "position_policy": self.position_policy}
        if self.budget is not None:
            out.update(budget=self.budget.tokens, convention=self.budget.convention)
        return out

    def __repr__(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in self.params().items() if k != "name")
        return f"{type(self).__name__}({knobs})"

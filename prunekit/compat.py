"""The transformers seam: every transformers name prunekit relies on outside a family's module layout.

Forward kwargs, output fields, config attributes and private fields are spelled here (and in the family
adapters), nowhere else: the runtime and the signals exchange small typed values with this module
(``LMCall``, ``LayerCall``, ``GenerateRequest``, ...). Changes between minors are found by feature detection
(signatures, attributes, the output fields themselves); a version is read only to warn outside the tested
range. docs/support.md ("transformers versions") gives the policy for admitting a new minor.
"""
from __future__ import annotations

import functools
import inspect
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import Tensor, nn

from .errors import SeamError, UnsupportedInputError

# The minors the CI matrix has passed on; pyproject's transformers requirement says the same (a test keeps
# them equal). The upper bound is the first minor not yet tested.
TESTED_RANGE = ">=5.17,<5.26"

# transformers 5.24 renamed the cache kwarg of model forwards, decoder layers, attention and the mask
# functions from ``past_key_values`` to ``cache`` (the old name is a deprecated alias until 5.40).
_OLD_CACHE, _NEW_CACHE = "past_key_values", "cache"


def tested_minors() -> list[str]:
    """Every minor of the tested range, oldest first (the CI matrix)."""
    bounds = {s.operator: Version(s.version) for s in SpecifierSet(TESTED_RANGE)}
    low, high = bounds[">="], bounds["<"]
    return [f"{low.major}.{m}" for m in range(low.minor, high.minor)]


def transformers_version() -> str:
    return transformers.__version__


def in_tested_range(version: str | None = None) -> bool:
    v = Version(version or transformers_version())
    return SpecifierSet(TESTED_RANGE).contains(Version(v.base_version), prereleases=True)


def seam_error(what: str) -> SeamError:
    """The SeamError for ``what`` the hooks did not see, naming this install's transformers and the tested range."""
    return SeamError(what, transformers_version(), TESTED_RANGE)


@functools.cache
def warn_if_untested() -> bool:
    """Warn once per process on a transformers outside the tested range; the runtime guards catch real breakage."""
    if in_tested_range():
        return False
    warnings.warn(
        f"prunekit runs on transformers {transformers_version()}, outside its tested range "
        f"transformers{TESTED_RANGE}. It will raise PruningError if it does not see what it expects; "
        "`python -m prunekit.doctor` checks this install.", stacklevel=3)
    return True


# --- loading --------------------------------------------------------------------------------------------
LOAD_KWARGS = {"use_kernels": False}  # 5.25 enables hub kernels by default: a download, and other RoPE numerics


# --- the cache kwarg --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _takes(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.forward).parameters  # follows the deprecation wrapper's __wrapped__


def cache_kwarg(module: nn.Module) -> str:
    """The name under which ``module``'s forward takes the KV cache. Read from the signature: 5.25's mask
    functions list both names, and up to 5.23 a ``cache`` kwarg may be something else (continuous batching)."""
    return _NEW_CACHE if _takes(type(module), _NEW_CACHE) else _OLD_CACHE


def _read_cache(module: nn.Module, kwargs: dict) -> Any:
    name = cache_kwarg(module)
    cache = kwargs.get(name)
    if cache is None and name == _NEW_CACHE:  # the deprecated alias, renamed by transformers' own decorator
        cache = kwargs.get(_OLD_CACHE)
    return cache


def unread_cache(module: nn.Module, kwargs: dict) -> str | None:
    """The name of a kwarg that holds a KV cache under a name ``module``'s forward does not take, if any."""
    expected = {cache_kwarg(module), _OLD_CACHE}
    for name, value in kwargs.items():
        if name not in expected and isinstance(value, transformers.Cache):
            return name
    return None


def cache_length(cache) -> int:
    return cache.get_seq_length() if cache is not None else 0


def new_cache(config):
    """The cache a language model creates for itself when asked for one."""
    return transformers.DynamicCache(config=config)


# --- the language model's call ----------------------------------------------------------------------------
@dataclass
class LMCall:
    """What the runtime reads and rewrites of one language-model forward."""

    inputs_embeds: Tensor | None
    attention_mask: Tensor | None
    position_ids: Tensor | None
    cache: Any
    use_cache: bool

    @classmethod
    def read(cls, module: nn.Module, kwargs: dict) -> "LMCall":
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(module.config, "use_cache", False))
        return cls(kwargs.get("inputs_embeds"), kwargs.get("attention_mask"), kwargs.get("position_ids"),
                   _read_cache(module, kwargs), bool(use_cache))

    def write(self, module: nn.Module, kwargs: dict) -> None:
        kwargs.update(inputs_embeds=self.inputs_embeds, attention_mask=self.attention_mask,
                      position_ids=self.position_ids)
        kwargs[cache_kwarg(module)] = self.cache


@dataclass
class LayerCall:
    """What a decoder layer's pre-hook reads and rewrites: the loop-level kwargs the language model computed."""

    attention_mask: Any
    position_ids: Tensor | None
    rope: tuple[Tensor, Tensor] | None  # the (cos, sin) tables
    cache: Any

    @classmethod
    def read(cls, module: nn.Module, kwargs: dict) -> "LayerCall":
        return cls(kwargs.get("attention_mask"), kwargs.get("position_ids"), kwargs.get("position_embeddings"),
                   _read_cache(module, kwargs))

    def write(self, kwargs: dict) -> None:
        kwargs.update(attention_mask=self.attention_mask, position_ids=self.position_ids)
        if self.rope is not None:
            kwargs["position_embeddings"] = self.rope


def causal_mask(config, inputs_embeds: Tensor, attention_mask: Tensor, cache, layer_idx: int):
    """transformers' own 4-D mask for ``config``'s attention backend. The cache goes positionally: its
    parameter was renamed in 5.24 and the position is the same in every version."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config, inputs_embeds, attention_mask, cache, position_ids=None, layer_idx=layer_idx)


# --- the top model's and generate's calls -----------------------------------------------------------------
@dataclass(frozen=True)
class CallFacts:
    """What a top-model / multimodal-model / generate call carries that the runtime must know."""

    pixels: bool
    video: bool
    labels: bool
    input_ids: Tensor | None = None  # the prompt ids and mask (pre-LLM strategies read the instruction off them)
    attention_mask: Tensor | None = None

    @classmethod
    def read(cls, kwargs: dict, args: tuple = ()) -> "CallFacts":
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], Tensor) and not args[0].is_floating_point():
            ids = args[0]  # forward(input_ids, ...) called positionally
        return cls(kwargs.get("pixel_values") is not None, kwargs.get("pixel_values_videos") is not None,
                   kwargs.get("labels") is not None, ids, mask if isinstance(mask, Tensor) and mask.dim() == 2 else None)


@dataclass(frozen=True)
class GenerateRequest:
    """The decoding settings of one ``generate`` call (its kwargs over the model's generation config)."""

    num_beams: int
    assisted: bool
    prefill_chunk_size: int | None
    cache_implementation: str | None
    input_ids: Tensor | None

    @classmethod
    def read(cls, model: nn.Module, args: tuple, kwargs: dict) -> "GenerateRequest":
        config = kwargs.get("generation_config") or model.generation_config

        def setting(name):
            return kwargs.get(name, getattr(config, name, None))

        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
        return cls(setting("num_beams") or 1,
                   kwargs.get("assistant_model") is not None or bool(setting("prompt_lookup_num_tokens")),
                   setting("prefill_chunk_size"), setting("cache_implementation"), ids)


def _eos_ids(model: nn.Module) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def generated_lengths(model: nn.Module, new_tokens: Tensor) -> list[int]:
    """Per row of ``generate``'s new tokens, how many it generated: up to and including its first end-of-sequence
    token (a row that finished early is padded after it)."""
    eos = _eos_ids(model)
    lengths = []
    for row in new_tokens.tolist():
        stop = next((t for t, token in enumerate(row) if token in eos), None)
        lengths.append(len(row) if stop is None else stop + 1)
    return lengths


def continuation_logits(model: nn.Module, inputs: dict, forced: Tensor) -> Tensor:
    """Teacher forcing through ``generate``: the prompt ``inputs`` is prefilled once, then ``forced[:, t]`` is fed
    at decode step ``t``. Returns the raw logits that predicted each forced token, ``(batch, steps, vocab)``.

    The continuation only ever enters as decode steps: a strategy attached to the model decides at the prefill,
    from the prompt alone (lmms-eval's loglikelihood must not let the answer choose the kept tokens). A forced
    end-of-sequence token is refused: ``generate`` would end that row and feed padding after it."""
    steps = forced.shape[1]
    start = inputs["input_ids"].shape[1]
    if _eos_ids(model) & set(forced.flatten().tolist()):
        raise UnsupportedInputError("the continuation holds the end-of-sequence token, which would end the row "
                                    "during teacher forcing; score a continuation without it")

    class Force(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - start
            out = torch.full_like(scores, float("-inf"))
            return out.scatter_(1, forced[:, step : step + 1].to(scores.device), 0.0)

    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, num_beams=1,
                         logits_processor=transformers.LogitsProcessorList([Force()]), output_logits=True,
                         return_dict_in_generate=True)
    if len(out.logits) != steps:
        raise SeamError(f"generate returned {len(out.logits)} steps of logits for {steps} forced tokens")
    return torch.stack(out.logits, dim=1)


# --- attention backends -------------------------------------------------------------------------------------
def attn_implementation(config) -> str:
    return config._attn_implementation


def asking_attention_maps(kwargs: dict) -> dict:
    """A forward's kwargs asking for every attention map (eager), as the published codes run."""
    return {**kwargs, "output_attentions": True}


def set_attn_implementation(config, impl: str) -> None:
    """Switch a (sub-)config's backend in place, bypassing the public setter's checks (a registered name)."""
    config._attn_implementation_internal = impl


# A CLIP tower's pieces, run by hand: the benchmark's oracle floor (through the adapters) and the pocket tower's
# training on windows of tokens.
def clip_input_embeddings(tower: nn.Module, pixels: Tensor) -> Tensor:
    """A CLIP tower's encoder input for a padded batch of ``pixels``: [CLS] and patch embeddings plus positions,
    pre-normed."""
    return tower.pre_layrnorm(tower.embeddings(pixels))


def clip_post_layernorm(tower: nn.Module) -> nn.Module | None:
    """A CLIP tower's final layer norm (meant for the pooled [CLS]; CDPruner applies it to the patches), or None
    for towers without one. LLaVA's CLIPVisionModel holds it directly, CLIPVisionModelWithProjection under
    ``vision_model``."""
    norm = getattr(tower, "post_layernorm", None)
    return norm if norm is not None else getattr(getattr(tower, "vision_model", None), "post_layernorm", None)


def clip_encoder_layers(tower: nn.Module) -> nn.ModuleList:
    return tower.encoder.layers


def run_encoder_layer(layer: nn.Module, hidden: Tensor) -> Tensor:
    """One encoder layer on an unpadded batch (no mask)."""
    out = layer(hidden, None)
    return out[0] if isinstance(out, tuple) else out


class AttentionModule:
    """What prunekit reads of one attention module's internals (Llama / CLIP style): its causality, scaling and
    projections, and its modeling file's RoPE and eager functions."""

    PROJECTIONS = ("q_proj", "k_proj", "v_proj")

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    def causal(self) -> bool:
        """The module's own ``is_causal`` (sdpa's fallback when a call does not say; absent means causal)."""
        return bool(getattr(self.module, "is_causal", True))

    @property
    def scaling(self) -> float:
        return self.module.scaling

    def missing(self, *, rope: bool) -> str | None:
        """The first attribute projecting q / k / v needs that the module lacks, or None."""
        needed = self.PROJECTIONS + (("head_dim", "scaling") if rope else ())
        return next((n for n in needed if getattr(self.module, n, None) is None), None)

    def projection(self, which: str) -> nn.Linear:
        """The linear layer projecting ``which`` (q / k / v)."""
        return getattr(self.module, f"{which}_proj")

    def heads(self, which: str, x: Tensor, head_dim: int | None = None) -> Tensor:
        """(B, H, L, d): projection ``which`` (q / k / v) of ``x`` (B, L, D) split into heads as the module does
        (with its q_norm / k_norm when it has them)."""
        module = self.module
        t = self.projection(which)(x).view(*x.shape[:2], -1, head_dim or module.head_dim)
        norm = getattr(module, f"{which}_norm", None)
        return (t if norm is None else norm(t)).transpose(1, 2)

    def rotate(self, query: Tensor, key: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor] | None:
        """The modeling file's ``apply_rotary_pos_emb`` (1-D RoPE) on q and k; None when it has none."""
        rotate = getattr(sys.modules[type(self.module).__module__], "apply_rotary_pos_emb", None)
        return None if rotate is None else rotate(query, key, cos, sin)

    def eager_function(self):
        """The modeling file's own ``eager_attention_forward`` (each family has one)."""
        return sys.modules[type(self.module).__module__].eager_attention_forward


@dataclass(frozen=True)
class AttentionCall:
    """The keyword arguments an ``AttentionInterface`` function receives that the probe needs."""

    scaling: float | None
    is_causal: bool | None

    @classmethod
    def read(cls, kwargs: dict) -> "AttentionCall":
        return cls(kwargs.get("scaling"), kwargs.get("is_causal"))

"""Model adapters: the only code that knows a model family's transformers internals.

An adapter names the modules the runtime hooks (vision tower, projector, language model, decoder
layers), finds the image-token span of each sample, maps span indices to patch grids, and builds RoPE
tables for new positions. Adding a family = one adapter file registered with ``@register_adapter``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .. import compat
from ..errors import UnsupportedModelError

_ADAPTERS: list[type["ModelAdapter"]] = []


def register_adapter(cls: type["ModelAdapter"]) -> type["ModelAdapter"]:
    _ADAPTERS.append(cls)
    return cls


def adapter_for(model: nn.Module) -> "ModelAdapter":
    """The adapter of ``model``'s family, or a clear error naming the supported families."""
    for cls in _ADAPTERS:
        if cls.matches(model):
            return cls(model)
    supported = ", ".join(f"{c.family} ({'/'.join(c.model_classes)})" for c in _ADAPTERS)
    raise UnsupportedModelError(
        f"prunekit has no adapter for {type(model).__name__}. Supported model families: {supported}. "
        "Load the model with its *ForConditionalGeneration class (e.g. AutoModelForImageTextToText)."
    )


def supported_families() -> list[str]:
    return [c.family for c in _ADAPTERS]


@dataclass
class ImageLayout:
    """How one image's vision units (crops) fill its placeholder span in the language model's sequence.

    ``units``: how many consecutive vision units (encoder batch rows / packed images) the image has.
    ``source`` (span,) long: for each span position, the unit token it holds as ``unit * tokens + token``
    (``tokens`` = tokens per unit), or -1 for a token no unit produced (LLaVA-NeXT's row newlines).
    ``grid``: the (rows, cols) raster grid of the span when it is one (None for LLaVA-NeXT's anyres layout).
    ``blended``: some span positions mix several unit tokens (LLaVA-OneVision's bilinear downscale of a large grid);
    ``source`` then names each one's nearest token, and no vision-side cut can be carried into the span.
    ``video``: the units are a video's frames.
    """

    units: int
    tokens: int
    source: Tensor
    grid: tuple[int, int] | None
    blended: bool = False
    video: bool = False

    @classmethod
    def identity(cls, tokens: int, grid: tuple[int, int] | None) -> "ImageLayout":
        return cls(1, tokens, torch.arange(tokens), grid)

    @property
    def span_length(self) -> int:
        return self.source.numel()

    @property
    def is_identity(self) -> bool:
        return self.units == 1 and self.span_length == self.tokens and bool((self.source == torch.arange(self.tokens)).all())


@dataclass
class VisualInjections:
    """Visual features a model adds to the hidden states after its first decoder layers, at the visual positions
    (Qwen3-VL's DeepStack). ``mask`` (B, L): the positions; ``features[i]`` (n, D): what is added after decoder
    layer ``i``, one row per True of ``mask`` in row-major order."""

    mask: Tensor
    features: list[Tensor]


class ModelAdapter(ABC):
    """The contract between the runtime and one model family (see docs/architecture.md, "The model adapter").

    Class facts the runtime branches on: ``packed_vision`` (the encoder runs all images as one flat sequence
    with ``cu_seqlens``, Qwen2-VL, instead of a padded batch), ``merge_size`` (encoder patches per visual token
    of the language model: Qwen's 2x2 PatchMerger = 4; vision-side decisions keep such groups whole), ``mrope``
    (3-D M-RoPE positions: kept tokens keep their original positions whatever the strategy's policy),
    ``raster_images`` (an image's tokens in the language model are one raster grid; not LLaVA-NeXT's anyres).
    """

    family: ClassVar[str]
    model_classes: ClassVar[tuple[str, ...]]
    packed_vision: ClassVar[bool] = False
    merge_size: ClassVar[int] = 1
    mrope: ClassVar[bool] = False
    raster_images: ClassVar[bool] = True  # an image's visual tokens in the LM form one raster grid
    full_grid_features: ClassVar[bool] = False  # the model reshapes each unit's full patch grid after the encoder
    pools_video: ClassVar[bool] = False  # the model pools each video frame's grid after the projector (OneVision)

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes

    # --- modules the runtime hooks ----------------------------------------------------------------
    @property
    @abstractmethod
    def multimodal_model(self) -> nn.Module:
        """The module whose forward receives ``input_ids`` and merges image features (captures the span)."""

    @property
    @abstractmethod
    def vision_tower(self) -> nn.Module: ...

    @property
    @abstractmethod
    def projector(self) -> nn.Module:
        """Input: vision features (images, N, Dv); output: embeddings (images, N, D)."""

    @property
    @abstractmethod
    def language_model(self) -> nn.Module: ...

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    @abstractmethod
    def vision_layers(self) -> nn.ModuleList:
        """The vision encoder's layers (``vision_layer`` sites prune between them)."""

    @property
    def vision_prefix_tokens(self) -> int:
        """Tokens before the patches in the vision encoder's sequence (CLS); never pruned there."""
        return 0

    @property
    @abstractmethod
    def vision_feature_layer(self) -> int:
        """0-based index of the vision layer whose output the projector reads."""

    def feature_groups(self, n_tokens: int) -> Tensor | None:
        """(n_tokens, g): the positions (after the prefix) in the vision feature layer's sequence of the g encoder
        patches each projector-input token is made of, where the model groups patches before the projector
        (InternVL's pixel shuffle: 4); None where a token is one patch."""
        return None

    def vision_attention(self, layer: int) -> nn.Module:
        return self.vision_layers[layer].self_attn

    def vision_input_norm(self, layer: int) -> nn.Module | None:
        """The norm in front of vision layer ``layer``'s attention (its input is the residual stream)."""
        return None

    def llm_attention(self, layer: int) -> nn.Module:
        return self.decoder_layers[layer].self_attn

    def llm_input_norm(self, layer: int) -> nn.Module | None:
        """The norm in front of decoder layer ``layer``'s attention (Llama family: ``input_layernorm``), if any."""
        return getattr(self.decoder_layers[layer], "input_layernorm", None)

    @property
    def llm_output_norm(self) -> nn.Module:
        """The language model's final norm (before the LM head)."""
        return self.language_model.norm

    @property
    def text_config(self):
        return self.language_model.config

    @property
    def num_llm_layers(self) -> int:
        return len(self.decoder_layers)

    def llm_recurrence_macs(self, layer: int) -> int | None:
        """For a decoder layer that mixes tokens by a linear-attention recurrence instead of softmax attention
        (Qwen3.5's Gated DeltaNet layers): its MACs per token besides its projections; None for softmax attention."""
        return None

    def llm_site_refusal(self) -> str | None:
        """Why the runtime cannot cut inside this language model (llm_layer sites), or None where it can."""
        return None

    # --- visual features added inside the language model (DeepStack) --------------------------------
    @property
    def injection_projectors(self) -> list[tuple[int, nn.Module]]:
        """(vision layer, module) per feature added inside the language model, in decoder-layer order: the module maps
        that vision layer's output (packed rows) to the features (Qwen3-VL's DeepStack mergers); a vision-side cut
        before it leaves it fewer rows."""
        return []

    def take_injections(self, kwargs: dict) -> VisualInjections | None:
        """The visual injections of a language-model call, removed from its kwargs so that the runtime adds them
        itself at the kept tokens; None where the family has none."""
        return None

    # --- calls: what the runtime reads and rewrites of each hooked forward (names: here and in compat) ---
    def read_lm_call(self, kwargs: dict) -> compat.LMCall:
        return compat.LMCall.read(self.language_model, kwargs)

    def write_lm_call(self, call: compat.LMCall, kwargs: dict) -> None:
        call.write(self.language_model, kwargs)

    def read_layer_call(self, layer: int, kwargs: dict) -> compat.LayerCall:
        return compat.LayerCall.read(self.decoder_layers[layer], kwargs)

    def read_multimodal_call(self, args: tuple, kwargs: dict) -> Tensor:
        """(B, L) visual-token mask of a multimodal-model forward: its image or video placeholders (a call holds one
        modality: runtime/guards.py; under generate the pixels may have gone through the tower before this call)."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        return self.visual_token_mask(input_ids, kwargs.get("inputs_embeds"))

    def read_vision_call(self, args: tuple, kwargs: dict) -> tuple[Tensor | None, Tensor | None]:
        """(pixel values, grid_thw or None) of a vision-tower forward."""
        pixels = args[0] if args else kwargs.get("pixel_values", kwargs.get("hidden_states"))
        return pixels, None

    def vision_mask_module(self, layer: int) -> nn.Module:
        """The module of vision layer ``layer`` whose forward takes the key-padding mask: the layer (CLIP) or, where
        the layer passes none on, its attention (InternVL)."""
        return self.vision_layers[layer]

    def with_attention_key_mask(self, args: tuple, kwargs: dict, key_mask: Tensor):
        """A ``vision_mask_module``'s (args, kwargs) with ``key_mask`` as its attention mask."""
        kwargs["attention_mask"] = key_mask
        return args, kwargs

    def with_vision_key_mask(self, args: tuple, kwargs: dict, hidden: Tensor, key_mask: Tensor | None):
        """A vision layer's (args, kwargs) with ``hidden`` as its input and ``key_mask`` as its attention mask."""
        if len(args) > 1:
            return (hidden, key_mask) + tuple(args[2:]), kwargs
        kwargs["attention_mask"] = key_mask
        return (hidden,), kwargs

    # --- the model's own pieces, run by hand (the benchmark's oracle floor, bench/oracle.py) ------------
    def input_embeddings(self, input_ids: Tensor) -> Tensor:
        """Rows of the language model's input-embedding table."""
        return self.language_model.embed_tokens(input_ids)

    @property
    def image_token_id(self) -> int:
        """The id of the image placeholder token in the prompt."""
        return self.model.config.image_token_id

    # --- video: frames are vision units of one video (docs/support.md, "Video") ------------------------
    @property
    def video_token_id(self) -> int | None:
        """The id of the video placeholder token; None where prunekit takes no video on this family."""
        return None

    def pooled_video(self, inputs: dict, n_patches: int) -> tuple[Tensor, list[int]] | None:
        """Where the captured call is a video whose frames the model pools after the projector: (G, g) the patches each
        pooled position blends, and each unit's (frame's) video length in frames; None otherwise."""
        return None

    def pool_video(self, features: Tensor) -> Tensor:
        """(frames, G, D): each frame's projected grid pooled as the model pools it (``pooled_video`` families)."""
        raise NotImplementedError(f"{self.family} pools no video")

    def visual_token_mask(self, input_ids: Tensor | None, inputs_embeds: Tensor | None = None) -> Tensor:
        """(B, L) bool: image or video placeholders, found the way the model finds them."""
        mask = self.image_token_mask(input_ids, inputs_embeds)
        if self.video_token_id is None:
            return mask
        return mask | self._placeholder_mask(self.language_model.embed_tokens, self.video_token_id, input_ids,
                                             inputs_embeds)

    @property
    def language_model_device(self) -> torch.device:
        """Where the language model's input-embedding table lives (instruction ids go there)."""
        return self.language_model.embed_tokens.weight.device

    @property
    def clip_tower(self) -> bool:
        """Whether the vision tower is a CLIP (a post-layernorm whose pooled [CLS] a CLIP visual projection reads)."""
        return compat.clip_post_layernorm(self.vision_tower) is not None

    def clip_text_encoder(self, path: str, strategy: str):
        """The CLIP text encoder + visual projection at ``path`` that matches this model's vision tower (CDPruner's
        relevance), on the tower's device; refused with the reason when the tower is not such a CLIP."""
        from .clip_text import ClipTextEncoder

        return ClipTextEncoder.load(path, self.vision_tower, next(self.vision_tower.parameters()).device, strategy)

    def lm_logits(self, hidden: Tensor) -> Tensor:
        """The LM head on the final norm of ``hidden`` (B, L, D)."""
        return self.model.lm_head(self.llm_output_norm(hidden))

    def run_decoder_layer(self, layer: nn.Module, hidden: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """One decoder layer on an unpadded causal batch (no mask, no cache)."""
        out = layer(hidden, attention_mask=None, position_embeddings=rope, position_ids=None, use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    def vision_embed(self, pixels: Tensor) -> Tensor:
        """The vision tower's input embeddings of a padded batch (CLIP: patch + position embeddings, pre-norm)."""
        return compat.clip_input_embeddings(self.vision_tower, pixels)

    def run_vision_layer(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        """One encoder layer on an unpadded batch."""
        return compat.run_encoder_layer(layer, hidden)

    def projector_input(self, features: Tensor) -> Tensor:
        """(units, tokens, D') the projector's input from each unit's (units, patches, D) feature-layer patches (prefix
        dropped): the patches themselves, or where the model groups them first (InternVL's pixel shuffle) the groups."""
        return features

    # --- sequence facts ---------------------------------------------------------------------------
    @abstractmethod
    def image_token_mask(self, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
        """(B, L) bool: where the image placeholder tokens sit, found the way the model finds them."""

    @abstractmethod
    def tokens_per_image(self) -> int | None:
        """Visual tokens per image before pruning, if fixed for the family (used to check budgets)."""

    @abstractmethod
    def image_grid(self, n_tokens: int) -> tuple[int, int] | None:
        """(rows, cols) of an intact image's visual tokens in raster order, if they form a grid."""

    # --- vision units and images ------------------------------------------------------------------
    def capture_vision_inputs(self, kwargs: dict) -> dict:
        """The call arguments (of ``generate``, the top model or the multimodal model) the adapter needs to lay
        out images: e.g. LLaVA-NeXT's ``image_sizes``. Empty for fixed layouts."""
        return {}

    def image_layouts(self, unit_tokens: list[int], inputs: dict) -> list[ImageLayout]:
        """One layout per image of the vision pass, from the tokens of each unit and the captured inputs.
        Default: one unit per image, its tokens in raster order."""
        return [ImageLayout.identity(n, self.image_grid(n)) for n in unit_tokens]

    def unit_grid(self, unit: int, n_tokens: int) -> tuple[int, int] | None:
        """(rows, cols) of vision unit ``unit``'s intact tokens (at the language model's granularity)."""
        return self.image_grid(n_tokens)

    def budget_units(self) -> int:
        """Vision units a per-image budget is split over at vision-side sites (LLaVA-NeXT: its most crops)."""
        return 1

    # --- positions --------------------------------------------------------------------------------
    def positions_in(self, position_ids: Tensor | None, batch: int, length: int, device) -> Tensor:
        """The language model's prefill positions as (B, L, C) long: C = 1, or 3 for M-RoPE."""
        if position_ids is None:
            position_ids = torch.arange(length, device=device)
        return position_ids.expand(batch, length)[..., None]

    def positions_out(self, positions: Tensor) -> Tensor:
        """(B, L, C) back to what the language model takes as ``position_ids``."""
        return positions[..., 0]

    def layer_position_ids(self, positions: Tensor) -> Tensor | None:
        """The ``position_ids`` the language model passes its decoder layers, for (B, L, C) positions."""
        return positions[..., 0]

    def rope(self, hidden_states: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin) for (B, L, C) ``positions``, computed exactly as the language model does."""
        return self.language_model.rotary_emb(hidden_states, position_ids=self.positions_out(positions))

    def rope_gravity(self, hidden_states: Tensor, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """(B, R, N) fp32: q·k of all-ones query and key vectors rotated by the language model's RoPE at
        ``query_positions`` (B, R, C) and ``key_positions`` (B, N, C) — the score RoPE alone adds between two
        positions (SparseVLM v2's attention gravity). Llama-style ``rotate_half`` RoPE; unscaled."""
        probe = hidden_states[:1, :1].float()  # rotary_emb reads only the device and dtype

        def rotated(positions: Tensor) -> Tensor:
            cos, sin = self.rope(probe, positions)
            ones = torch.ones_like(cos)
            half = ones.shape[-1] // 2
            return ones * cos + torch.cat([-ones[..., half:], ones[..., :half]], -1) * sin

        return rotated(query_positions) @ rotated(key_positions).transpose(-1, -2)

    def describe(self) -> str:
        return f"{self.family} ({type(self.model).__name__})"

    @staticmethod
    def _placeholder_mask(embed: nn.Module, token_id: int, input_ids, inputs_embeds) -> Tensor:
        if input_ids is not None:
            return input_ids == token_id
        ref = embed(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == ref).all(-1)

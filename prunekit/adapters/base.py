"""Model adapters: the only code that knows a model family's transformers internals.

An adapter names the modules the runtime hooks (vision tower, projector, language model, decoder
layers), finds the image-token span of each sample, maps span indices to patch grids, and builds RoPE
tables for new positions. Adding a family = one adapter file registered with ``@register_adapter``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn

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
    raise TypeError(
        f"prunekit has no adapter for {type(model).__name__}. Supported model families: {supported}. "
        "Load the model with its *ForConditionalGeneration class (e.g. AutoModelForImageTextToText)."
    )


def supported_families() -> list[str]:
    return [c.family for c in _ADAPTERS]


class ModelAdapter(ABC):
    family: ClassVar[str]
    model_classes: ClassVar[tuple[str, ...]]

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

    def rope(self, hidden_states: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin) for ``position_ids``, computed exactly as the language model does."""
        return self.language_model.rotary_emb(hidden_states, position_ids=position_ids)

    def rope_gravity(self, hidden_states: Tensor, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """(B, R, N) fp32: q·k of all-ones query and key vectors rotated by the language model's RoPE at
        ``query_positions`` (B, R) and ``key_positions`` (B, N) — the score RoPE alone adds between two
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

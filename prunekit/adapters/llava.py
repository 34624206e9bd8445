"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, MLP projector, Llama-family decoder."""
from __future__ import annotations

import math

from typing import ClassVar

from torch import Tensor, nn

from .. import compat
from .base import ModelAdapter, register_adapter


@register_adapter
class LlavaAdapter(ModelAdapter):
    family = "llava-1.5"
    model_classes = ("LlavaForConditionalGeneration",)
    # the vision_feature_select_strategy the family uses: "default" drops [CLS] before the projector; "full" keeps
    # every token (LLaVA-OneVision's SigLIP, which has no [CLS])
    feature_selection: ClassVar[str] = "default"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        cfg = model.config
        if cfg.vision_feature_select_strategy != self.feature_selection:
            raise ValueError(
                f"prunekit's {self.family} adapter expects vision_feature_select_strategy={self.feature_selection!r}, "
                f"this model uses {cfg.vision_feature_select_strategy!r}"
            )
        if not isinstance(cfg.vision_feature_layer, int):
            raise ValueError(f"prunekit's {self.family} adapter expects a single vision_feature_layer (an int)")

    @property
    def multimodal_model(self) -> nn.Module:
        return self.model.model

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def vision_layers(self) -> nn.ModuleList:
        return compat.clip_encoder_layers(self.vision_tower)

    def vision_input_norm(self, layer: int) -> nn.Module:
        return self.vision_layers[layer].layer_norm1

    @property
    def vision_prefix_tokens(self) -> int:
        return 1 if self.feature_selection == "default" else 0  # [CLS], which 'default' drops before the projector

    @property
    def vision_feature_layer(self) -> int:
        # hidden_states[k] is the output of layer k-1 (hidden_states[0] = embeddings)
        k = self.model.config.vision_feature_layer % (len(self.vision_layers) + 1)
        return k - 1

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def image_token_mask(self, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
        return self._placeholder_mask(
            self.language_model.embed_tokens, self.model.config.image_token_id, input_ids, inputs_embeds
        )

    def tokens_per_image(self) -> int:
        vc = self.model.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2

    def image_grid(self, n_tokens: int) -> tuple[int, int] | None:
        side = math.isqrt(n_tokens)
        return (side, side) if side * side == n_tokens else None

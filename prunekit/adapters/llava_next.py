"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres crops through CLIP, unpadding, row newlines.

Vision units are crops: the base image plus the high-resolution tiles, all through CLIP as one batch, so
vision-side strategies decide per crop (as the references do). The model then lays each image out as the
base crop's tokens followed by the tiles' tokens in raster order of the full high-resolution grid, minus
the letterbox rows/columns (``unpad_image``), with one ``image_newline`` token after each grid row. The
layout is read off the model's own ``pack_image_features`` run on token indices, never re-derived.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import ImageLayout, register_adapter
from .llava import LlavaAdapter


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    family = "llava-next"
    model_classes = ("LlavaNextForConditionalGeneration",)
    raster_images = False

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._layouts: dict[tuple[int, int], ImageLayout] = {}

    def tokens_per_image(self) -> None:
        return None  # 1 + up to len(pinpoint cells) crops, minus unpadding, plus newlines: depends on the image

    def tokens_per_crop(self) -> int:
        return super().tokens_per_image()

    def budget_units(self) -> int:
        """The most crops an image can have: the base image plus the largest pinpoint grid."""
        side = self.model.config.vision_config.image_size
        return 1 + max((h // side) * (w // side) for h, w in self.model.config.image_grid_pinpoints)

    def capture_vision_inputs(self, kwargs: dict) -> dict:
        sizes = kwargs.get("image_sizes")
        return {} if sizes is None else {"image_sizes": sizes}

    def image_layouts(self, unit_tokens: list[int], inputs: dict) -> list[ImageLayout]:
        sizes = inputs.get("image_sizes")
        if sizes is None:
            from ..errors import PruningError

            raise PruningError("LLaVA-NeXT lays images out from image_sizes, and this call passed none")
        return [self._layout(tuple(int(v) for v in size)) for size in sizes]

    def _layout(self, size: tuple[int, int]) -> ImageLayout:
        if size not in self._layouts:
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            cfg = self.model.config
            crops = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            n = self.tokens_per_crop()
            cpu = torch.device("cpu")  # bookkeeping: on the CPU whatever the model's device
            index = torch.arange(crops * n, dtype=torch.float64, device=cpu).view(crops, n, 1)
            (packed,), _ = self.model.model.pack_image_features(
                [index], torch.tensor([size], device=cpu), cfg.vision_feature_select_strategy,
                image_newline=torch.tensor([-1.0], dtype=torch.float64, device=cpu))
            self._layouts[size] = ImageLayout(crops, n, packed[:, 0].round().long(), None)
        return self._layouts[size]

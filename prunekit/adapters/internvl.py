"""InternVL (``InternVLForConditionalGeneration``, the -hf checkpoints of InternVL2.5 / InternVL3): dynamic tiling,
an InternViT with [CLS], pixel shuffle, an MLP projector and a Qwen2 language model.

Vision units are tiles: an image is cut into 1..max_patches tiles plus a thumbnail when there is more than one,
all through the ViT as one batch, so vision-side strategies decide per tile. After the ViT the model drops [CLS]
and pixel-shuffles each tile's patch grid (0.5: every 2x2 block of patches becomes one token of 4x the width)
before the projector, so one language-model token is 4 ViT patches. An image's placeholder span holds its tiles'
tokens one tile after the other (``<img>`` and ``</img>`` around it are text), raster order inside a tile.

Sites: ``vision_layer`` inside the ViT keeps or drops whole 2x2 patch groups (the runtime puts the survivors back
into each tile's full grid after the last layer, for the pixel shuffle; runtime/grouped.py), ``vision_output`` is the
projector's input (the shuffled tokens), ``projector_output`` its output, ``llm_layer`` inside Qwen2. Attention
signals of a token are summed over its 4 patches, keys and values averaged.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import PruningError
from .base import ImageLayout, register_adapter
from .llava import LlavaAdapter

DEFAULT_MAX_TILES = 12  # the InternVL3 processors' max_patches


@register_adapter
class InternVLAdapter(LlavaAdapter):
    """LLaVA's module layout and feature selection ([CLS] dropped, one feature layer), with InternViT, tiles and
    the pixel shuffle."""

    family = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)
    raster_images = False  # tiles one after the other, not one raster grid
    merge_size = 4  # ViT patches per language-model token (the pixel shuffle): cuts in the ViT keep whole groups
    full_grid_features = True  # the pixel shuffle reshapes each tile's full grid: ViT cuts are scattered back first

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._groups: dict[int, Tensor] = {}

    # --- InternViT ----------------------------------------------------------------------------------
    @property
    def vision_layers(self) -> nn.ModuleList:
        return self.vision_tower.encoder.layer

    def vision_attention(self, layer: int) -> nn.Module:
        return self.vision_layers[layer].attention

    def vision_input_norm(self, layer: int) -> nn.Module:
        return self.vision_layers[layer].layernorm_before

    def vision_mask_module(self, layer: int) -> nn.Module:
        return self.vision_layers[layer].attention  # InternVLVisionLayer takes no mask; its attention does

    def with_vision_key_mask(self, args: tuple, kwargs: dict, hidden: Tensor, key_mask: Tensor | None):
        return (hidden,) + tuple(args[1:]), kwargs  # the mask goes to the attention (vision_mask_module)

    def vision_embed(self, pixels: Tensor) -> Tensor:
        return self.vision_tower.embeddings(pixels)  # [CLS] + patches + positions; no pre-norm

    def run_vision_layer(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        return layer(hidden)

    def projector_input(self, features: Tensor) -> Tensor:
        """Each tile's full patch grid pixel-shuffled by the model's own ``pixel_shuffle``: 2x2 patches per token."""
        units, n, width = features.shape
        side = math.isqrt(n)
        grid = self.model.model.pixel_shuffle(features.reshape(units, side, side, width),
                                              scale_factor=self.model.config.downsample_ratio)
        return grid.reshape(units, -1, grid.shape[-1])

    # --- sequence facts ------------------------------------------------------------------------------
    def tokens_per_image(self) -> None:
        return None  # tiles x tokens per tile: depends on the image

    def tokens_per_tile(self) -> int:
        return self.model.config.image_seq_length

    def image_grid(self, n_tokens: int) -> tuple[int, int] | None:
        return self.unit_grid(0, n_tokens) if n_tokens == self.tokens_per_tile() else None  # a one-tile image

    def feature_groups(self, n_tokens: int) -> Tensor:
        """(n_tokens, 4): the patches (row-major in the tile's grid, after [CLS]) of each shuffled token, in the
        order their features are concatenated; read off the model's own ``pixel_shuffle`` run on patch indices."""
        if n_tokens not in self._groups:
            ratio = self.model.config.downsample_ratio
            side = math.isqrt(round(n_tokens / ratio**2))
            if side * side * ratio**2 != n_tokens:
                raise PruningError(f"InternVL: {n_tokens} tokens at the projector are not a pixel-shuffled square grid")
            index = torch.arange(side * side, dtype=torch.float64).view(1, side, side, 1)
            shuffled = self.model.model.pixel_shuffle(index, scale_factor=ratio)  # (1, s', s', 1 / ratio^2)
            self._groups[n_tokens] = shuffled.reshape(n_tokens, -1).round().long()
        return self._groups[n_tokens]

    # --- tiles and images ----------------------------------------------------------------------------
    def capture_vision_inputs(self, kwargs: dict) -> dict:
        ids = kwargs.get("input_ids")
        return {} if ids is None else {"input_ids": ids}

    def image_layouts(self, unit_tokens: list[int], inputs: dict) -> list[ImageLayout]:
        """Each image's tiles from its placeholder run in the prompt (the processor writes one run of
        tiles x tokens-per-tile ``<IMG_CONTEXT>`` between ``<img>`` and ``</img>``); images in batch order."""
        ids = inputs.get("input_ids")
        if ids is None:
            raise PruningError("InternVL's tiles per image are read off the prompt's placeholder runs, and this call "
                               "passed no input_ids (pass input_ids, not inputs_embeds, with pixel_values)")
        per_tile = self.tokens_per_tile()
        layouts = []
        for run in _runs(ids == self.image_token_id):
            tiles, rest = divmod(run, per_tile)
            if rest:
                raise PruningError(f"an InternVL image placeholder run of {run} tokens is not a whole number of "
                                   f"{per_tile}-token tiles; prompt and images do not line up")
            layouts.append(ImageLayout(tiles, per_tile, torch.arange(run), self.image_grid(run)))
        if sum(lay.units for lay in layouts) != len(unit_tokens):
            raise PruningError(f"the prompt's image placeholders hold {sum(lay.units for lay in layouts)} tiles, "
                               f"the vision tower encoded {len(unit_tokens)}; prompt and images do not line up")
        return layouts

    def budget_units(self) -> int:
        """The most tiles an image can have: ``max_dynamic_patch`` (InternVL's own config name; the -hf configs leave
        it to the processor, whose InternVL3 default is 12) plus the thumbnail."""
        tiles = getattr(self.model.config, "max_dynamic_patch", DEFAULT_MAX_TILES)
        return tiles + (1 if tiles > 1 and getattr(self.model.config, "use_thumbnail", True) else 0)

    def unit_grid(self, unit: int, n_tokens: int) -> tuple[int, int] | None:
        return super().image_grid(n_tokens)  # a tile is a square raster grid, as a LLaVA image


def _runs(mask: Tensor) -> list[int]:
    """Lengths of the runs of True in each row of ``mask`` (B, L), rows in order."""
    lengths = []
    for row in mask.cpu():
        edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int8), row.to(torch.int8), torch.zeros(1, dtype=torch.int8)]))
        starts, ends = (edges == 1).nonzero().squeeze(1), (edges == -1).nonzero().squeeze(1)
        lengths += (ends - starts).tolist()
    return lengths

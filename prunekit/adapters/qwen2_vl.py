"""Qwen2-VL and Qwen2.5-VL: a packed ViT (all images as one flat sequence, ``cu_seqlens``), a 2x2 PatchMerger,
3-D M-RoPE positions in the language model, and (2.5) window attention in most ViT blocks.

What the runtime needs to know, and nothing else, lives here:

- the vision units are images; the language model's visual token is a merge group of ``merge_size`` = 4
  consecutive encoder patches (the image processor orders patches block-major), so vision-side decisions are
  taken per group and keep groups whole;
- Qwen2.5-VL permutes groups into window order before the blocks (``window_index``) and undoes it after the
  merger: ``PackedImages.row_group`` maps every encoder row to its group in raster order, ``row_window`` to
  its attention window, so a pruned sequence can rebuild ``cu_seqlens`` / ``cu_window_seqlens``;
- positions are (3, B, L) M-RoPE ids (4 rows with a leading text row under ``generate``); the runtime keeps
  kept tokens' original ids, so decoding continues from ``rope_deltas`` of the full prompt, as the references do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import ModelAdapter, register_adapter


@dataclass
class PackedImages:
    """The geometry of one packed vision pass (one row per image of ``grid_thw``)."""

    patches: list[int]  # encoder rows (patches) per unit: an image, or one temporal patch (frame) of a video
    grids: list[tuple[int, int]]  # per unit: its merge-group grid (rows, cols), the LLM tokens' raster grid
    row_group: Tensor  # (rows,) long: global group id (unit-major, raster within the unit) of each encoder row
    row_window: Tensor | None  # (rows,) long: attention window of each encoder row (Qwen2.5-VL), else None
    frames: list[int] | None = None  # per unit: the frames of its video (1: an image); None: a pass of images

    @property
    def groups(self) -> list[int]:
        return [r * c for r, c in self.grids]


@register_adapter
class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2-vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    packed_vision = True
    mrope = True

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.merge = self.vision_tower.spatial_merge_size
        self.merge_size = self.merge**2

    @property
    def multimodal_model(self) -> nn.Module:
        return self.model.model

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.visual

    @property
    def vision_layers(self) -> nn.ModuleList:
        return self.vision_tower.blocks

    def vision_attention(self, layer: int) -> nn.Module:
        return self.vision_layers[layer].attn

    def vision_input_norm(self, layer: int) -> nn.Module:
        return self.vision_layers[layer].norm1

    @property
    def vision_feature_layer(self) -> int:
        return len(self.vision_layers) - 1  # the merger reads the last block's output

    @property
    def projector(self) -> nn.Module:
        return self.vision_tower.merger

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def image_token_mask(self, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
        return self._placeholder_mask(
            self.language_model.embed_tokens, self.model.config.image_token_id, input_ids, inputs_embeds
        )

    def tokens_per_image(self) -> None:
        return None  # dynamic resolution

    def image_grid(self, n_tokens: int) -> None:
        return None  # not square in general: grids come from image_grid_thw (unit_grid)

    # --- the packed encoder -----------------------------------------------------------------------
    def read_vision_call(self, args: tuple, kwargs: dict) -> tuple[Tensor | None, Tensor | None]:
        pixels = args[0] if args else kwargs.get("hidden_states", kwargs.get("pixel_values"))
        return pixels, args[1] if len(args) > 1 else kwargs.get("grid_thw")

    @staticmethod
    def read_packed_block_call(kwargs: dict) -> tuple[tuple[Tensor, Tensor], int | None]:
        """(rotary tables, max_seqlen or None) a vision block receives."""
        return kwargs["position_embeddings"], kwargs.get("max_seqlen")

    @staticmethod
    def write_packed_block_call(call, kwargs: dict) -> None:
        """A vision block's kwargs from a ``runtime.packed.BlockCall``."""
        kwargs.update(cu_seqlens=call.cu_seqlens, position_embeddings=call.rotary)
        if call.max_seqlen is not None:
            kwargs["max_seqlen"] = call.max_seqlen

    def vision_embed_packed(self, pixels: Tensor, grid_thw: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """(rows, D) patch embeddings of a packed pass and their rotary tables (cos, sin)."""
        from transformers.vision_utils import get_vision_position_ids

        visual = self.vision_tower
        hidden = visual.patch_embed(pixels)
        return hidden, visual.rotary_pos_emb(hidden, get_vision_position_ids(grid_thw, visual.spatial_merge_size))

    @staticmethod
    def run_vision_block(block: nn.Module, hidden: Tensor, cu_seqlens: Tensor, rotary: tuple[Tensor, Tensor]) -> Tensor:
        """One packed ViT block over sequences bounded by ``cu_seqlens`` (no windows)."""
        return block(hidden, cu_seqlens=cu_seqlens, position_embeddings=rotary)

    def packed_images(self, grid_thw: Tensor) -> PackedImages:
        """The pass's units: each image, and each temporal patch of a video (grid t > 1), which the ViT attends
        within on its own (``cu_seqlens`` per frame) and the merger groups 2x2 like an image; rows are frame-major."""
        thw = grid_thw.tolist()
        units = [(t, h, w) for t, h, w in thw for _ in range(t)]
        patches = [h * w for _, h, w in units]
        grids = [(h // self.merge, w // self.merge) for _, h, w in units]
        rows = torch.arange(sum(patches))
        row_group, row_window = self._encoder_order(grid_thw, rows)
        frames = [t for t, _, _ in units] if any(t > 1 for t, _, _ in thw) else None
        return PackedImages(patches, grids, row_group, row_window, frames)

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_id

    def _encoder_order(self, grid_thw: Tensor, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        return rows // self.merge_size, None  # block-major patches, images one after another

    def block_windowed(self, layer: int) -> bool:
        """Whether vision block ``layer`` attends within windows (``cu_window_seqlens``) rather than images."""
        return False

    # --- positions: (3, B, L) M-RoPE ids ----------------------------------------------------------
    def positions_in(self, position_ids: Tensor | None, batch: int, length: int, device) -> Tensor:
        if position_ids is None:
            position_ids = torch.arange(length, device=device)
        if position_ids.dim() == 3 and position_ids.shape[0] == 4:  # generate's leading text row
            position_ids = position_ids[1:]
        if position_ids.dim() < 3:
            position_ids = position_ids.expand(batch, length)[None].expand(3, batch, length)
        return position_ids.expand(3, batch, length).permute(1, 2, 0)

    def positions_out(self, positions: Tensor) -> Tensor:
        return positions.permute(2, 0, 1)

    def layer_position_ids(self, positions: Tensor) -> None:
        return None  # the language model passes its layers no ids for (3, B, L) positions


@register_adapter
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2.5-vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)

    def _encoder_order(self, grid_thw: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        from transformers.vision_utils import get_vision_window_index

        tower = self.vision_tower
        window_index, cu_windows = get_vision_window_index(
            grid_thw.cpu(), spatial_merge_size=tower.spatial_merge_size, window_size=tower.window_size,
            patch_size=tower.patch_size)
        row_group = window_index.cpu()[rows // self.merge_size]
        cu = torch.as_tensor(cu_windows).cpu().long()
        row_window = torch.bucketize(rows, cu[1:], right=True)
        return row_group, row_window

    def block_windowed(self, layer: int) -> bool:
        return layer not in self.vision_tower.fullatt_block_indexes

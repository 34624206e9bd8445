"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): Qwen2-VL's packed ViT and 2x2 PatchMerger (16 px patches,
learned position embeddings resampled to each image, no windows), M-RoPE with interleaved sections, a Qwen3
language model (q / k norms), and DeepStack.

DeepStack: after the ViT blocks ``deepstack_visual_indexes`` (8, 16 and 24 of 27 on the 8B) a merger of its own maps
the packed rows to language-model-width features, one per merge group, and the language model adds the i-th of them
to its hidden states after decoder layer i, at the visual positions. The adapter hands the runtime those features
and their positions (``take_injections``), so that the runtime adds them itself: at the tokens still alive, each
its own row, whatever was cut before (docs/support.md, "Qwen3-VL and DeepStack").
"""
from __future__ import annotations

from torch import Tensor, nn

from .. import compat
from .base import VisualInjections, register_adapter
from .qwen2_vl import Qwen2VLAdapter


@register_adapter
class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3-vl"
    model_classes = ("Qwen3VLForConditionalGeneration",)

    @property
    def injection_projectors(self) -> list[tuple[int, nn.Module]]:
        tower = self.vision_tower
        return list(zip(tower.deepstack_visual_indexes, tower.deepstack_merger_list))

    def take_injections(self, kwargs: dict) -> VisualInjections | None:
        mask, features = kwargs.pop("visual_pos_masks", None), kwargs.pop("deepstack_visual_embeds", None)
        if features is None:
            return None
        if mask is None:
            raise compat.seam_error("Qwen3-VL's language model received DeepStack features without their positions "
                                    "(visual_pos_masks)")
        return VisualInjections(mask.to(bool), list(features))

    def vision_embed_packed(self, pixels: Tensor, grid_thw: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Patch embeddings plus the learned position table resampled to each image's grid, as the tower adds them."""
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

        visual = self.vision_tower
        indices, weights = get_vision_interpolation_indices_and_weights(
            grid_thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.spatial_merge_size)
        hidden = visual.patch_embed(pixels)
        hidden = hidden + (visual.pos_embed(indices) * weights[:, :, None]).sum(1).to(hidden.dtype)
        return hidden, visual.rotary_pos_emb(hidden, get_vision_position_ids(grid_thw, visual.spatial_merge_size))

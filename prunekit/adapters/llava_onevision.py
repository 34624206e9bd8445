"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, the llava-hf checkpoints): a SigLIP tower without
[CLS], LLaVA-NeXT's anyres crops with ``anyres_max`` downscaling, row newlines, a Qwen2 language model.

Vision units are crops, as on LLaVA-NeXT: the base image plus the high-resolution tiles, all through SigLIP as one
batch; every crop's last-layer patches ("full": no token dropped) go through the projector. The model then lays an
image out as the base crop's tokens followed by the unpadded high-resolution grid with one newline per row. Two
differences from LLaVA-NeXT, both read off the model's own ``pack_image_features`` run on token indices:

- ``anyres_max_N``: a grid larger than about N crops is bilinearly downscaled, so each of its positions blends up to
  4 crop tokens. Such an image's layout is ``blended``: llm_layer strategies run on it, a vision-side cut is refused;
- a sample with several images gives each image its base crop only, plus one newline (``batch_num_images``).

A video's frames are its vision units: SigLIP and the projector run on each frame's full grid, the model pools each
frame's projected grid 2x2 (bilinear, ``apply_pooling``) and appends one newline per video. A frame's tokens are its
pooled positions, each the group of patches it blends (``pooled_video``, read off the model's own pooling): inside the
tower a cut keeps whole groups (runtime/grouped.py), the full grid is restored for the projector and the pooling, and
the language model's entry drops the positions cut.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import PruningError
from .base import ImageLayout, register_adapter
from .llava_next import LlavaNextAdapter


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava-onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    feature_selection = "full"  # SigLIP has no [CLS]: every token reaches the projector
    pools_video = True

    @property
    def clip_tower(self) -> bool:
        return False  # SigLIP: no CLIP text tower matches it

    def vision_embed(self, pixels: Tensor) -> Tensor:
        return self.vision_tower.embeddings(pixels)  # SigLIP: no pre-layernorm

    def budget_units(self) -> int:
        """The base crop plus the most tiles whose grid reaches the LLM undownscaled: ``anyres_max_N`` caps the grid
        at about N crops' tokens (9 on the released checkpoints: 10 units), and only such images take vision-side
        cuts; fewer where the pinpoints allow fewer tiles."""
        cfg = self.model.config
        most = super().budget_units() - 1
        ratio = str(cfg.vision_aspect_ratio)
        return 1 + (min(most, int(ratio.removeprefix("anyres_max_"))) if ratio.startswith("anyres_max_") else most)

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_id

    def pooled_video(self, inputs: dict, n_patches: int) -> tuple[Tensor, list[int]] | None:
        """The patches each pooled position of a frame blends (those with a weight in the model's own ``apply_pooling``
        run on one-hot features; 2x2, fewer where an odd side makes a window land on a patch edge, then padded with
        its first patch), and the frames of each unit's video."""
        if "video_frames" not in inputs:
            return None
        key = ("pooled", n_patches)
        if key not in self._layouts:
            one_hot = torch.eye(n_patches, dtype=torch.float64).view(1, n_patches, n_patches)
            weights = self.model.model.apply_pooling(one_hot)[0]  # (G, patches)
            groups = [row.nonzero().squeeze(1) for row in weights]
            self._layouts[key] = torch.stack([torch.cat([g, g[:1].repeat(4 - len(g))]) for g in groups])
        return self._layouts[key], [f for f in inputs["video_frames"] for _ in range(f)]

    def pool_video(self, features: Tensor) -> Tensor:
        return self.model.model.apply_pooling(features)

    def capture_vision_inputs(self, kwargs: dict) -> dict:
        videos = kwargs.get("pixel_values_videos")
        if videos is not None:  # (videos, frames, C, H, W)
            return {"video_frames": [videos.shape[1]] * videos.shape[0]}
        return {k: kwargs[k] for k in ("image_sizes", "batch_num_images") if kwargs.get(k) is not None}

    def image_layouts(self, unit_tokens: list[int], inputs: dict) -> list[ImageLayout]:
        if "video_frames" in inputs:
            return [self._video_layout(frames, unit_tokens[0]) for frames in inputs["video_frames"]]
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise PruningError("LLaVA-OneVision lays images out from image_sizes, and this call passed none")
        per_sample = inputs.get("batch_num_images")
        whole = [True] * len(sizes) if per_sample is None else [int(n) == 1 for n in per_sample for _ in range(int(n))]
        return [self._layout(tuple(int(v) for v in size), crops) for size, crops in zip(sizes, whole)]

    def _layout(self, size: tuple[int, int], anyres: bool = True) -> ImageLayout:
        key = (size, anyres)
        if key not in self._layouts:
            from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

            cfg = self.model.config
            crops = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size) if anyres else 1
            n = self.tokens_per_crop()
            cpu = torch.device("cpu")  # bookkeeping: on the CPU whatever the model's device
            index = torch.arange(crops * n, dtype=torch.float64, device=cpu).view(crops, n, 1)
            # a position holding one token t reads (t, t^2); a blend of several reads a second value above the square
            (packed,), _ = self.model.model.pack_image_features(
                image_features=[torch.cat([index, index**2], -1)], image_sizes=torch.tensor([size], device=cpu),
                image_newline=torch.tensor([-1.0, 1.0], dtype=torch.float64, device=cpu),
                vision_aspect_ratio=cfg.vision_aspect_ratio)
            source = packed[:, 0].round().long()
            blended = bool(((packed[:, 1] - packed[:, 0] ** 2).abs() > 1e-6).any())
            self._layouts[key] = ImageLayout(crops, n, source, None, blended)
        return self._layouts[key]

    def _video_layout(self, frames: int, n: int) -> ImageLayout:
        """A video's span: each frame's ``n`` pooled positions in raster order, frame after frame, then one newline."""
        key = ("video", frames, n)
        if key not in self._layouts:
            source = torch.cat([torch.arange(frames * n), torch.tensor([-1])])
            self._layouts[key] = ImageLayout(frames, n, source, None, video=True)  # frames' grids: unit_grid
        return self._layouts[key]

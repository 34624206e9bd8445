"""What one prefill leaves for the hooks that follow it: the vision pass and the language model's segments."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import PruningError
from ..pruner import content_seed
from ..trace import SampleTrack
from .grouped import GroupedRows
from .packed import PackedState
from .sequence import Segment


@dataclass
class VisionPass:
    """State of one pass through the vision tower + projector, consumed by the next prefill."""

    pixel_values: Tensor | None
    images: list[SampleTrack] | None = None  # per image: which of its N tokens survive, and members
    events: list[tuple[str, list[int], list[Tensor]]] = field(default_factory=list)  # per image: n in, kept after
    seeds: dict[int, int] = field(default_factory=dict)
    live: Tensor | None = None  # (images, prefix + n) bool inside the encoder once counts are ragged
    key_mask: Tensor | None = None  # matching additive key-padding mask for the encoder layers
    layer_counts: Tensor | None = None  # (images, encoder layers): patches entering each layer
    prefix: Tensor | None = None  # (images, P, D) the feature layer's output at the prefix tokens, on request
    packed: PackedState | None = None  # packed encoders (Qwen2-VL): the live rows and the blocks' kwargs
    grouped: GroupedRows | None = None  # encoders whose tokens are patch groups made after them (InternVL)
    projector_counts: Tensor | None = None  # (units,) tokens the projector maps (FLOPs)
    video_frames: list[int] | None = None  # per unit: the frames of its video, where the pass is a video's frames
    pooled: bool = False  # a video whose frames the model pools after the projector (OneVision): units are frames

    def lengths(self) -> Tensor:
        """(images,) tokens each image still has."""
        return torch.tensor([len(d.kept) for d in self.images])

    def seed(self, image: int) -> int:
        if image not in self.seeds:
            if self.pixel_values is None:
                raise PruningError("a randomised strategy needs the pixel values of each image for its seed")
            pixels = self.pixel_values[image] if self.packed is None else self.packed.pixels(self.pixel_values, image)
            self.seeds[image] = content_seed(pixels)
        return self.seeds[image]


@dataclass
class Prefill:
    """What the last prefill decided, kept to rewrite its decode steps."""

    cache: Any  # weakref to the KV cache filled by this prefill, or None
    length_orig: int
    entry: Segment
    segments: list[Segment]  # llm_layer segments, in layer order
    active: bool  # False when nothing was pruned (no images): decode passes through
    vision: VisionPass | None = None
    sample_images: list[list[int]] = field(default_factory=list)  # per sample: its units in the vision pass
    step: int = 0
    step_positions: Tensor | None = None  # original positions of the current decode step's tokens
    step_tail: Tensor | None = None  # mask columns of generated tokens, current step included
    embeds: Tensor | None = None  # the language model's (pruned) input embeddings, kept for prompt signals
    injections: list[Tensor] | None = None  # features added after decoder layer i at the visual slots' ``rows``
    injection_offsets: Tensor | None = None  # (B,) each sample's first row of them (rows are image tokens in order)

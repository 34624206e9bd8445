"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``): natively multimodal, Qwen3-VL's packed ViT (16 px patches, 2x2
merge, learned positions, no DeepStack) before a hybrid language model: Gated DeltaNet linear-attention layers
between full-attention layers (three to one), each kind with a mask of its own.

Vision-side and projector-side strategies run as on Qwen3-VL: the runtime cuts the ViT, or the merged tokens before
the language model, which then builds both of its masks from the pruned 2-D mask itself. Cuts inside the language
model are refused: a linear-attention layer scans the sequence with a recurrent state and takes a mask of its own
kind, which the runtime does not rebuild for a shortened sequence, and its layers have no attention rows to score.
"""
from __future__ import annotations

from torch import nn

from .base import register_adapter
from .qwen3_vl import Qwen3VLAdapter


@register_adapter
class Qwen3_5Adapter(Qwen3VLAdapter):
    family = "qwen3.5"
    model_classes = ("Qwen3_5ForConditionalGeneration",)

    @property
    def injection_projectors(self) -> list[tuple[int, nn.Module]]:
        return []  # no DeepStack

    def llm_recurrence_macs(self, layer: int) -> int | None:
        """The depthwise causal convolution (channels x kernel) and, per token, the delta rule's three state products
        (retrieve S k, the rank-one update, read out S q: 3 x value heads x d_k x d_v), as the recurrent form counts
        them (the chunked kernel orders the same work differently)."""
        mixer = getattr(self.decoder_layers[layer], "linear_attn", None)
        if mixer is None:
            return None
        return mixer.conv1d.weight.numel() + 3 * mixer.num_v_heads * mixer.head_k_dim * mixer.head_v_dim

    def llm_site_refusal(self) -> str:
        kinds = sorted(set(self.text_config.layer_types))
        return (f"its language model is hybrid ({' and '.join(kinds)} layers): a linear-attention layer scans the "
                "sequence with a recurrent state under a mask of its own kind, which prunekit does not rebuild for a "
                "sequence shortened inside the model; prune before it (vision_layer, vision_output, projector_output)")

"""Analytic prefill FLOPs of one sample, from the token counts a PruneTrace records.

Two conventions, both counted in multiply-accumulates (MACs) as the token-pruning papers do when they
write "FLOPs" (a true FLOP count is twice as large):

- ``fastv``: the language model only, FastV's per-layer ``4nd² + 2n²d + 2ndm`` (docs/evaluation.md,
  efficiency conventions) with the live token count n of each layer; what the papers' TFLOPs columns use.
- ``exact``: every weight matrix the prefill actually multiplies (so a gated FFN counts 3ndm and grouped-query
  attention its smaller K/V projections), plus the ``2n²d`` score/value products of each attention layer
  over the live tokens, for the vision encoder (patch embedding, every encoder layer with the tokens it
  takes), the projector (and Qwen3-VL's DeepStack mergers, each over the groups of the layer it reads), the language
  model (a linear-attention layer: its projections, convolution and state recurrence, no n² term) and the one
  LM-head row ``generate`` computes in prefill.

Decode steps are not counted: pruning changes them only through the shorter KV cache. Nor are a strategy's
own score computations (a few O(n·d) rows per site): the count is the model's, so strategies compare on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn


def _linear_macs(module: nn.Module) -> int:
    """MACs per token of every ``nn.Linear`` in ``module`` (in_features × out_features each)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def fastv_layer_macs(n: float, d: int, m: int) -> float:
    """FastV's count for one decoder layer over n tokens: 4nd² + 2n²d + 2ndm."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


@dataclass(frozen=True)
class FlopsModel:
    """Per-token weight MACs and attention widths of one model, read off its modules once."""

    llm_hidden: int
    llm_intermediate: int
    llm_layer_linear: tuple[int, ...]  # per decoder layer: MACs per token of its matrices
    llm_attention_width: int  # heads × head_dim: the width of the n² score and value products
    lm_head_macs: int
    vision_layer_linear: tuple[int, ...]
    vision_attention_width: int
    vision_prefix: int  # CLS
    patch_embed_macs: int  # MACs per patch of the patch embedding
    projector: int  # MACs per visual token
    merge_size: int = 1  # encoder patches per visual token
    llm_quadratic: tuple[bool, ...] = ()  # per decoder layer: softmax attention (n² products); () = every layer
    llm_state_macs: tuple[int, ...] = ()  # per decoder layer: MACs per token of a linear-attention recurrence
    injections: tuple[tuple[int, int], ...] = ()  # (vision layer, MACs per visual token) of each DeepStack merger

    @classmethod
    def from_model(cls, model: nn.Module) -> "FlopsModel":
        from .adapters import adapter_for

        adapter = adapter_for(model)
        text = adapter.text_config
        layers = range(len(adapter.decoder_layers))
        recurrence = [adapter.llm_recurrence_macs(i) for i in layers]
        llm_attn = adapter.llm_attention(next(i for i in layers if recurrence[i] is None))
        vis_attn = adapter.vision_attention(0)
        embed = next((m for m in adapter.vision_tower.modules() if isinstance(m, nn.Conv2d | nn.Conv3d)), None)
        head = model.get_output_embeddings()
        return cls(
            llm_hidden=text.hidden_size,
            llm_intermediate=text.intermediate_size,
            llm_layer_linear=tuple(_linear_macs(layer) for layer in adapter.decoder_layers),
            llm_attention_width=_attention_width(llm_attn),
            lm_head_macs=head.in_features * head.out_features if head is not None else 0,
            vision_layer_linear=tuple(_linear_macs(layer) for layer in adapter.vision_layers),
            vision_attention_width=_attention_width(vis_attn),
            vision_prefix=adapter.vision_prefix_tokens,
            patch_embed_macs=embed.weight.numel() if embed is not None else 0,
            projector=_linear_macs(adapter.projector),
            merge_size=adapter.merge_size,
            llm_quadratic=tuple(r is None for r in recurrence),
            llm_state_macs=tuple(r or 0 for r in recurrence),
            injections=tuple((layer, _linear_macs(m)) for layer, m in adapter.injection_projectors),
        )

    def prefill(self, text_tokens: int, llm_visual: Sequence[int], images: int = 0,
                vision_patches: Sequence[int] | None = None, patches_per_image: int | Sequence[int] = 0,
                projector_tokens: int | None = None) -> dict[str, float]:
        """MACs of one sample's prefill.

        ``llm_visual``: visual tokens entering each decoder layer (``trace.llm_layer_counts[b]``);
        ``vision_patches``: patches entering each encoder layer over all the sample's images
        (``trace.vision_layer_counts[b]``; default: all ``patches_per_image`` of each image everywhere);
        ``projector_tokens``: tokens the projector maps (default: those entering the language model);
        ``patches_per_image``: one count for every image, or one per image (Qwen: images of different sizes).
        """
        if len(llm_visual) != len(self.llm_layer_linear):
            raise ValueError(f"llm_visual has {len(llm_visual)} layers, the model {len(self.llm_layer_linear)}")
        llm_exact = fastv = 0.0
        quadratic = self.llm_quadratic or (True,) * len(llm_visual)
        state = self.llm_state_macs or (0,) * len(llm_visual)
        for per_token, visual, softmax, recurrence in zip(self.llm_layer_linear, llm_visual, quadratic, state):
            n = text_tokens + visual
            llm_exact += n * (per_token + recurrence) + (2 * n * n * self.llm_attention_width if softmax else 0)
            fastv += fastv_layer_macs(n, self.llm_hidden, self.llm_intermediate)
        vision = 0.0
        if images:
            sizes = [patches_per_image] * images if isinstance(patches_per_image, int) else list(patches_per_image)
            total = sum(sizes)
            if vision_patches is None:
                vision_patches = [total] * len(self.vision_layer_linear)
            # attention runs per image; after a cut the per-image split is not recorded, so each image keeps the
            # layer's share of its patches (exact unpruned, and whenever a cut keeps the same share of every image)
            for per_token, patches in zip(self.vision_layer_linear, vision_patches):
                share = patches / total if total else 0.0
                for size in sizes:
                    n_image = size * share + self.vision_prefix
                    vision += n_image * per_token + 2 * n_image * n_image * self.vision_attention_width
            vision += total * self.patch_embed_macs
            # a merger reading vision layer i's output maps the groups that layer ran on
            vision += sum(vision_patches[i] / self.merge_size * macs for i, macs in self.injections)
        if projector_tokens is None:
            projector_tokens = llm_visual[0] if len(llm_visual) else 0
        projector = projector_tokens * self.projector
        exact = vision + projector + llm_exact + self.lm_head_macs
        return {"fastv": fastv, "exact": exact, "exact_llm": llm_exact, "exact_vision": vision + projector}


def _attention_width(attn: nn.Module) -> int:
    heads = getattr(attn, "num_heads", None) or attn.config.num_attention_heads
    return int(heads * attn.head_dim)


def trace_flops(flops: FlopsModel, trace, sample: int, text_tokens: int, unpruned: bool = False) -> dict[str, float]:
    """:meth:`FlopsModel.prefill` of one sample of the last prefill, read off its ``PruneTrace``;
    ``unpruned``: the same sample with every visual token kept everywhere (the vanilla model)."""
    track = trace.samples[sample]
    if trace.vision_units is not None:  # encoder units (images; LLaVA-NeXT: crops) and their projector-level tokens
        images = trace.vision_units[sample]
        per_image = trace.unit_patches[sample]  # each unit's patches (Qwen: own sizes; a pooled video frame: its grid)
        tokens = sum(per_image) // trace.merge_size  # the projector's input, unpruned (a pooled frame: its whole grid)
    else:
        images = int(track.image_of.max()) + 1 if track.span_length else 0
        tokens = track.span_length
        per_image = tokens // max(images, 1) * trace.merge_size
    if unpruned:
        return flops.prefill(text_tokens, [track.span_length] * len(flops.llm_layer_linear), images=images,
                             patches_per_image=per_image, projector_tokens=tokens)
    vision = trace.vision_layer_counts[sample].tolist() if trace.vision_layer_counts is not None else None
    at_projector = trace.projector_tokens[sample] if trace.projector_tokens is not None else None
    return flops.prefill(text_tokens, trace.llm_layer_counts[sample].tolist(), images=images, vision_patches=vision,
                         patches_per_image=per_image, projector_tokens=at_projector)

"""The oracle floor: the model's own layers run on exactly the token counts a pruned prefill recorded, with no
hooks, no scoring, no masks and no bookkeeping.

The schedule comes from the pruned run's ``PruneTrace`` (patches entering each encoder layer, tokens the
projector maps, visual tokens entering each decoder layer). The oracle keeps the *first* n tokens wherever the
count drops: which tokens survive does not change the cost, only the count does. So pruned time / oracle time
is what prunekit adds over the physical floor of the same schedule: signals, selection, gathers, masks, and the
runtime's Python. It is a loop over the model's own modules, batch of equal-length prompts (no padding).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..adapters import adapter_for
from ..trace import PruneTrace


def schedule(trace: PruneTrace) -> dict:
    """Per-unit vision counts per encoder layer, projector tokens per unit, and LM visual counts per layer
    (the batch maximum: the oracle runs rectangular tensors, as prunekit's padded batch does)."""
    units = max(trace.vision_units or [1])
    vision = trace.vision_layer_counts
    llm = trace.llm_layer_counts
    return {
        "vision": None if vision is None else [-(-int(c) // units) for c in vision.max(0).values.tolist()],
        "projector": None if trace.projector_tokens is None else -(-max(trace.projector_tokens) // units),
        "llm": [int(c) for c in llm.max(0).values.tolist()],
    }


@torch.no_grad()
def oracle_prefill(model, inputs: dict, plan: dict | None = None) -> Tensor:
    """Last-position logits (B, V) of a hook-free prefill under ``plan`` (None: every token everywhere)."""
    adapter = adapter_for(model)
    injections = []  # Qwen3-VL's DeepStack features, added after the first decoder layers
    if adapter.packed_vision:
        visual = _qwen_vision(model, adapter, inputs, plan, injections)
    else:
        visual = _clip_vision(model, adapter, inputs, plan)
    return _language_model(model, adapter, inputs, visual, plan, injections)


def _clip_vision(model, adapter, inputs, plan) -> Tensor:
    """(B, tokens per sample, D) projected features, the encoder cut to the plan's counts (CLS kept)."""
    pixels, batch = inputs["pixel_values"], inputs["input_ids"].shape[0]
    pixels = pixels.flatten(0, 1) if pixels.dim() == 5 else pixels  # LLaVA-NeXT: every crop; InternVL: tiles, flat
    hidden = adapter.vision_embed(pixels)
    feature, prefix = adapter.vision_feature_layer, adapter.vision_prefix_tokens
    patches = hidden.shape[1] - prefix
    for i, layer in enumerate(adapter.vision_layers):  # the model runs every layer, the last one unused
        if plan is not None and plan["vision"] is not None:
            hidden = hidden[:, : prefix + plan["vision"][i]]
        hidden = adapter.run_vision_layer(layer, hidden)
        if i == feature:
            features = hidden[:, prefix:]
    if adapter.full_grid_features and features.shape[1] < patches:  # InternVL: survivors back in the full grid
        features = torch.cat([features, features.new_zeros(features.shape[0], patches - features.shape[1],
                                                           features.shape[2])], 1)
    features = adapter.projector_input(features)
    if plan is not None and plan["projector"] is not None:
        features = features[:, : plan["projector"]]
    return adapter.projector(features).reshape(batch, -1, adapter.text_config.hidden_size)


def _qwen_vision(model, adapter, inputs, plan, injections: list) -> Tensor:
    """(B, merged tokens per sample, D): the packed ViT cut to whole merge groups, one image per sample; appends the
    DeepStack mergers' (B, groups, D) outputs to ``injections``."""
    grid = inputs["image_grid_thw"]
    batch, size = grid.shape[0], adapter.merge_size
    hidden, (cos, sin) = adapter.vision_embed_packed(inputs["pixel_values"], grid)
    rows = hidden.shape[0] // batch
    mergers = dict(adapter.injection_projectors)

    def cut(x: Tensor, n: int) -> Tensor:
        return x.view(batch, rows, -1)[:, :n].reshape(batch * n, -1)

    for i, block in enumerate(adapter.vision_layers):
        n = rows if plan is None or plan["vision"] is None else min(rows, plan["vision"][i])
        if n < rows:
            hidden, cos, sin, rows = cut(hidden, n), cut(cos, n), cut(sin, n), n
        cu = torch.arange(batch + 1, device=hidden.device, dtype=torch.int32) * rows
        hidden = adapter.run_vision_block(block, hidden, cu, (cos, sin))
        if i in mergers:
            injections.append(mergers[i](hidden).view(batch, rows // size, -1))
    if plan is not None and plan["projector"] is not None and plan["projector"] * size < rows:
        hidden, rows = cut(hidden, plan["projector"] * size), plan["projector"] * size
    return adapter.projector(hidden).view(batch, rows // size, -1)


def _language_model(model, adapter, inputs, visual: Tensor, plan, injections: list) -> Tensor:
    """The decoder on [text before, n visual, text after], n dropping to the plan's count at each layer; after layer
    i the i-th injection's first n rows are added at the visual tokens."""
    ids = inputs["input_ids"]
    span = adapter.image_token_mask(ids, None)[0].nonzero().squeeze(1)
    start, end = int(span[0]), int(span[-1]) + 1
    before, after = adapter.input_embeddings(ids[:, :start]), adapter.input_embeddings(ids[:, end:])
    counts = plan["llm"] if plan is not None else [end - start] * len(adapter.decoder_layers)
    n = counts[0]
    if visual.shape[1] < n:  # LLaVA-NeXT's newlines (and unpadding) are not in the crops' features
        visual = torch.cat([visual, visual[:, : n - visual.shape[1]]], 1)
    hidden = torch.cat([before, visual[:, :n].to(before.dtype), after], 1)
    table = _rope(adapter, hidden)
    for i, layer in enumerate(adapter.decoder_layers):
        if counts[i] < n:
            hidden = torch.cat([hidden[:, : start + counts[i]], hidden[:, start + n :]], 1)
            n, table = counts[i], _rope(adapter, hidden)
        hidden = adapter.run_decoder_layer(layer, hidden, table)
        if i < len(injections):
            hidden = torch.cat([hidden[:, :start], hidden[:, start : start + n] + injections[i][:, :n].to(hidden.dtype),
                                hidden[:, start + n :]], 1)
    return adapter.lm_logits(hidden[:, -1:])[:, 0]


def _rope(adapter, hidden: Tensor) -> tuple[Tensor, Tensor]:
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None, :, None].expand(hidden.shape[0], -1, 1)
    return adapter.rope(hidden, positions.expand(-1, -1, 3) if adapter.mrope else positions)

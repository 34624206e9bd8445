"""Model shapes for the speed benchmark: the real 7B architectures built from their configs with random
weights (weights do not change speed), and scaled-down shapes with the same visual-token counts for CPU.

Each shape gives a model and ``inputs(batch)``: a batch of identical-length prompts (no padding) with random
pixels and the right number of image placeholders, built without a processor (none can be downloaded here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

IMAGE_TOKEN, VISION_START, VISION_END, VIDEO_TOKEN = 32000, 32001, 32002, 32003
PROMPT_TEXT = 40  # text tokens around the image: a short question plus the chat template


@dataclass
class Shape:
    name: str
    family: str
    model: torch.nn.Module
    inputs: Callable[[int], dict]  # batch size -> model inputs
    visual_tokens: int  # per image, unpruned (LLaVA-NeXT: base + unpadded grid + newlines)
    vision_width: int  # the vision tower's width (CDPruner's stand-in CLIP text encoder must match it)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _llama(hidden, layers, heads, kv_heads, intermediate, vocab=32064):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _clip(hidden, layers, heads, intermediate, image_size=336):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=image_size, patch_size=14, projection_dim=768)


# name -> (family, vision config, text config): 7b / 8b = the published checkpoints' shapes; cpu = same token counts
SIZES = {
    "7b": dict(clip=(1024, 24, 16, 4096), llama=(4096, 32, 32, 32, 11008),
               qwen_vision=(1280, 32, 16), qwen_text=(3584, 28, 28, 4, 18944, 152064),
               # Qwen3-VL-8B: (width, depth, heads, MLP, DeepStack blocks), Qwen3-8B; LLaVA-OneVision-7B: SigLIP, Qwen2-7B
               qwen3_vision=(1152, 27, 16, 4304, (8, 16, 24)), qwen3_text=(4096, 36, 32, 8, 12288, 151936),
               siglip=(1152, 26, 16, 4304), onevision_text=(3584, 28, 28, 4, 18944, 152000),
               # InternVL3-8B: InternViT-300M (width, depth, heads, MLP), Qwen2.5-7B
               internvit=(1024, 24, 16, 4096), internvl_text=(3584, 28, 28, 4, 18944, 151674)),
    "cpu": dict(clip=(128, 24, 4, 256), llama=(256, 32, 4, 4, 688),
                qwen_vision=(128, 32, 4), qwen_text=(224, 28, 4, 2, 608, 32064),
                qwen3_vision=(128, 27, 4, 256, (8, 16, 24)), qwen3_text=(256, 36, 4, 2, 688, 32064),
                siglip=(128, 26, 4, 256), onevision_text=(224, 28, 4, 2, 608, 32064),
                internvit=(128, 24, 4, 256), internvl_text=(224, 28, 4, 2, 608, 32064)),
    "tiny": dict(clip=(64, 6, 4, 128), llama=(128, 4, 4, 2, 256),
                 qwen_vision=(64, 6, 4), qwen_text=(128, 4, 4, 2, 256, 32064),
                 qwen3_vision=(64, 6, 4, 128, (1, 3, 4)), qwen3_text=(128, 4, 4, 2, 256, 32064),
                 siglip=(64, 6, 4, 128), onevision_text=(128, 4, 4, 2, 256, 32064),
                 internvit=(64, 6, 4, 128), internvl_text=(128, 4, 4, 2, 256, 32064)),
}
FAMILIES = {"llava15": "7b", "llava_next": "7b", "qwen2_vl": "7b", "qwen3_vl": "8b", "llava_onevision": "7b",
            "internvl": "8b"}
NEXT_IMAGE = (672, 672)  # 2x2 grid + base: 5 crops, the most LLaVA-NeXT's default pinpoints give
QWEN_IMAGE = (672, 672)  # 48x48 patches -> 576 merged tokens, LLaVA-1.5's count
QWEN3_IMAGE = (768, 768)  # 16 px patches: 48x48 -> 576 merged tokens


def build(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, attn: str = "sdpa") -> Shape:
    """``<family>_<size>``: family llava15 | llava_next | qwen2_vl | qwen3_vl | llava_onevision | internvl, size cpu |
    tiny | the published size (8b for qwen3_vl and internvl, 7b for the others)."""
    family, _, size = name.rpartition("_")
    published = FAMILIES.get(family)
    if published is None or size not in (published, "cpu", "tiny"):
        names = ", ".join(f"{f}_{{{p}|cpu|tiny}}" for f, p in FAMILIES.items())
        raise ValueError(f"unknown shape {name!r}: use one of {names}")
    s = SIZES["7b" if size == published else size]
    torch.manual_seed(0)
    with torch.device(device):
        if family == "qwen2_vl":
            return _qwen(name, s, dtype, attn)
        if family == "qwen3_vl":
            return _qwen3(name, s, dtype, attn)
        if family == "llava_onevision":
            return _onevision(name, s, dtype, attn, image_size=384 if size != "tiny" else 112)
        if family == "internvl":
            return _internvl(name, s, dtype, attn, image_size=448 if size != "tiny" else 112)
        return _llava(name, family, s, dtype, attn, image_size=336 if size != "tiny" else 112)


def _llava(name, family, s, dtype, attn, image_size) -> Shape:
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration)

    vision, text = _clip(*s["clip"], image_size=image_size), _llama(*s["llama"])
    common = dict(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
                  vision_feature_select_strategy="default")
    side = image_size
    if family == "llava15":
        cfg, cls = LlavaConfig(**common, image_seq_length=(side // 14) ** 2), LlavaForConditionalGeneration
    else:
        pinpoints = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side], [3 * side, side], [side, 3 * side]]
        cfg, cls = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints), LlavaNextForConditionalGeneration
    model = cls._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
    device = next(model.parameters()).device
    if family == "llava15":
        tokens = (side // 14) ** 2

        def inputs(batch: int) -> dict:
            pixels = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
            return {**_prompt(batch, tokens, device), "pixel_values": pixels}
    else:
        from ..adapters import adapter_for

        size = (2 * side, 2 * side)
        layout = adapter_for(model)._layout(size)
        tokens = layout.span_length

        def inputs(batch: int) -> dict:
            pixels = torch.randn(batch, layout.units, 3, side, side, device=device, dtype=dtype)
            sizes = torch.tensor([size] * batch, device=device)
            return {**_prompt(batch, tokens, device), "pixel_values": pixels, "image_sizes": sizes}
    return Shape(name, family, model, inputs, tokens, s["clip"][0])


def _qwen(name, s, dtype, attn) -> Shape:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    v_dim, v_depth, v_heads = s["qwen_vision"]
    hidden, layers, heads, kv, inter, vocab = s["qwen_text"]
    head_dim = hidden // heads
    section = [head_dim // 8, head_dim * 3 // 16, head_dim // 2 - head_dim // 8 - head_dim * 3 // 16]
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32768,
                bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section})
    vision = dict(depth=v_depth, embed_dim=v_dim, hidden_size=hidden, num_heads=v_heads, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, video_token_id=VIDEO_TOKEN)
    model = Qwen2VLForConditionalGeneration._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
    side = QWEN_IMAGE[0] if not name.endswith("tiny") else 224
    return _packed_shape(name, "qwen2_vl", model, side // 14, 14, dtype, v_dim)


def _packed_shape(name, family, model, grid: int, patch: int, dtype, vision_width: int) -> Shape:
    """A packed-ViT shape (Qwen): one image of grid x grid patches per sample, a merged token per 2x2 patches."""
    device = next(model.parameters()).device
    tokens = grid * grid // 4

    def inputs(batch: int) -> dict:
        x = _prompt(batch, tokens, device, start=VISION_START, end=VISION_END)
        pixels = torch.randn(batch * grid * grid, 3 * 2 * patch * patch, device=device, dtype=dtype)
        thw = torch.tensor([[1, grid, grid]] * batch, device=device)
        return {**x, "pixel_values": pixels, "image_grid_thw": thw,
                "mm_token_type_ids": (x["input_ids"] == IMAGE_TOKEN).int()}
    return Shape(name, family, model, inputs, tokens, vision_width)


def _qwen3(name, s, dtype, attn) -> Shape:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    v_dim, v_depth, v_heads, v_mlp, deepstack = s["qwen3_vision"]
    hidden, layers, heads, kv, inter, vocab = s["qwen3_text"]
    head_dim = hidden // heads  # 128 on the 8B
    half = head_dim // 2  # interleaved M-RoPE sections (temporal, height, width): 24 / 20 / 20 of 64 on the 8B
    section = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, max_position_embeddings=32768,
                bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": section,
                                 "mrope_interleaved": True})
    vision = dict(depth=v_depth, hidden_size=v_dim, intermediate_size=v_mlp, num_heads=v_heads, out_hidden_size=hidden,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                  deepstack_visual_indexes=list(deepstack))
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, video_token_id=VIDEO_TOKEN)
    model = Qwen3VLForConditionalGeneration._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
    side = QWEN3_IMAGE[0] if not name.endswith("tiny") else 256
    return _packed_shape(name, "qwen3_vl", model, side // 16, 16, dtype, v_dim)


def _onevision(name, s, dtype, attn, image_size) -> Shape:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    from ..adapters import adapter_for

    v_dim, v_depth, v_heads, v_mlp = s["siglip"]
    hidden, layers, heads, kv, inter, vocab = s["onevision_text"]
    side = image_size
    vision = SiglipVisionConfig(hidden_size=v_dim, intermediate_size=v_mlp, num_hidden_layers=v_depth,
                                num_attention_heads=v_heads, image_size=side, patch_size=14, vision_use_head=False)
    text = dict(model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                max_position_embeddings=32768, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    pinpoints = [[side * h, side * w] for h in range(1, 7) for w in range(1, 7)]  # the released 1..6 x 1..6 grids
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                               video_token_index=VIDEO_TOKEN, image_grid_pinpoints=pinpoints,
                               vision_aspect_ratio="anyres_max_9", vision_feature_layer=-1,
                               vision_feature_select_strategy="full")
    model = LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
    device = next(model.parameters()).device
    size = (3 * side, 3 * side)  # 3x3 crops + base: the most anyres_max_9 keeps undownscaled (budget_units = 10)
    layout = adapter_for(model)._layout(size)

    def inputs(batch: int) -> dict:
        pixels = torch.randn(batch, layout.units, 3, side, side, device=device, dtype=dtype)
        sizes = torch.tensor([size] * batch, device=device)
        return {**_prompt(batch, layout.span_length, device), "pixel_values": pixels, "image_sizes": sizes,
                "batch_num_images": torch.ones(batch, dtype=torch.long, device=device)}
    return Shape(name, "llava_onevision", model, inputs, layout.span_length, v_dim)


def _internvl(name, s, dtype, attn, image_size) -> Shape:
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    v_dim, v_depth, v_heads, v_mlp = s["internvit"]
    hidden, layers, heads, kv, inter, vocab = s["internvl_text"]
    side = image_size
    per_tile = (side // 28) ** 2  # 14 px patches, pixel shuffle 0.5: 256 tokens a 448 px tile
    vision = dict(hidden_size=v_dim, intermediate_size=v_mlp, num_hidden_layers=v_depth, num_attention_heads=v_heads,
                  image_size=[side, side], patch_size=[14, 14], use_mean_pooling=True)
    text = dict(model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                max_position_embeddings=32768, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_seq_length=per_tile, image_token_id=IMAGE_TOKEN,
                         downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
                         tie_word_embeddings=False)  # Qwen2.5-7B's LM head is a matrix of its own
    model = InternVLForConditionalGeneration._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
    device = next(model.parameters()).device
    tiles = 13  # the most InternVL3 tiles (12, max_dynamic_patch) + the thumbnail: vision-side budgets split over 13
    tokens = tiles * per_tile

    def inputs(batch: int) -> dict:
        pixels = torch.randn(batch * tiles, 3, side, side, device=device, dtype=dtype)
        return {**_prompt(batch, tokens, device, start=VISION_START, end=VISION_END), "pixel_values": pixels}
    return Shape(name, "internvl", model, inputs, tokens, v_dim)


def _prompt(batch: int, image_tokens: int, device, start: int | None = None, end: int | None = None) -> dict:
    """[BOS] system text, the image placeholders, the question: the same length for every sample (no padding)."""
    g = torch.Generator().manual_seed(0)
    before, after = torch.randint(3, 31000, (12,), generator=g), torch.randint(3, 31000, (PROMPT_TEXT - 12,), generator=g)
    image = torch.full((image_tokens,), IMAGE_TOKEN)
    parts = [torch.tensor([1]), before] + ([torch.tensor([start])] if start else []) + [image] \
        + ([torch.tensor([end])] if end else []) + [after]
    ids = torch.cat(parts).expand(batch, -1).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

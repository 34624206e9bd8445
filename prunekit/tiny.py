"""Tiny random-weight VLMs with offline processors: the embedded default and the test models.

Eight families, each a ~1M-parameter model built from config with a processor made in memory:
LLaVA-1.5 (``build_tiny_llava``), LLaVA-NeXT (``build_tiny_llava_next``), Qwen2-VL (``build_tiny_qwen2_vl``),
Qwen2.5-VL (``build_tiny_qwen2_5_vl``), InternVL (``build_tiny_internvl``), Qwen3-VL (``build_tiny_qwen3_vl``),
LLaVA-OneVision (``build_tiny_onevision``) and Qwen3.5 (``build_tiny_qwen3_5``). No hub access: the tokenizer vocabulary, image processor and
chat template are saved next to the weights (``tiny_model_dir``), so ``from_pretrained(path)`` exercises the
same loading code as a real checkpoint. A random-weight model's answers are meaningless; use it for
mechanics and fidelity.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .cache import build_once, cache_root

IMAGE_TOKEN = "<image>"
VERSION = "v2"  # bump when the LLaVA-1.5 recipe changes, so cached copies are rebuilt

# Qwen-style chat: <|im_start|>role\n ... <|im_end|>\n; an image item is <|vision_start|><|image_pad|><|vision_end|>
# (the processor expands <|image_pad|> to one token per merged 2x2 patch group), a video item the same with
# <|video_pad|> (Qwen3-VL: one such wrapper per frame after its timestamp).
QWEN_SPECIAL_TOKENS = ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

def build_tokenizer():
    """Llama-style tokenizer (byte fallback, so any text encodes) with ``<pad>`` and ``<image>``; left padding."""
    from transformers import LlamaTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789?!:;.,'-\n▁")
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + chars)}
    tok = LlamaTokenizer(vocab=vocab, merges=[], padding_side="left")
    tok.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def build_qwen_tokenizer():
    """Qwen2-style byte-level tokenizer (256 byte tokens, no merges, no BOS) with the Qwen special tokens;
    ``<|endoftext|>`` pads, ``<|im_end|>`` ends a turn; left padding."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    return tok


def _llama_text_config(tok, text_layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=text_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def _clip_config(image_size: int, patch_size: int, vision_layers: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=vision_layers,
                            num_attention_heads=4, image_size=image_size, patch_size=patch_size, projection_dim=64)


def _instantiate(cls, cfg, attn_implementation: str, seed: int, tok):
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation=attn_implementation).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def build_tiny_llava(image_size: int = 112, patch_size: int = 14, vision_layers: int = 6, text_layers: int = 4,
                     attn_implementation: str = "sdpa", seed: int = 0):
    """(model, processor): a ~1M-parameter LLaVA-1.5 with (image_size/patch_size)^2 visual tokens."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from .processors import LLAVA_CHAT_TEMPLATE

    tok = build_tokenizer()
    cfg = LlavaConfig(vision_config=_clip_config(image_size, patch_size, vision_layers),
                      text_config=_llama_text_config(tok, text_layers),
                      image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                      image_seq_length=(image_size // patch_size) ** 2, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id)
    model = _instantiate(LlavaForConditionalGeneration, cfg, attn_implementation, seed, tok)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    return model, processor


def build_tiny_llava_next(image_size: int = 112, vision_layers: int = 6, text_layers: int = 4,
                          attn_implementation: str = "sdpa", seed: int = 0):
    """(model, processor): a ~1M-parameter LLaVA-NeXT (AnyRes) with a CLIP tower of ``image_size`` px crops,
    14 px patches and pinpoints [[s, 2s], [2s, s], [2s, 2s]]. The visual-token count depends on the image:
    a base crop of (s/14)^2 plus the unpadded high-resolution grid with one newline token per row."""
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil,
                              LlavaNextProcessor)

    from .processors import LLAVA_CHAT_TEMPLATE

    patch_size, s = 14, image_size
    pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    tok = build_tokenizer()
    cfg = LlavaNextConfig(vision_config=_clip_config(s, patch_size, vision_layers),
                          text_config=_llama_text_config(tok, text_layers),
                          image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), image_grid_pinpoints=pinpoints,
                          image_seq_length=(s // patch_size) ** 2, vision_feature_layer=-2,
                          vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id)
    model = _instantiate(LlavaNextForConditionalGeneration, cfg, attn_implementation, seed, tok)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_CHAT_TEMPLATE)
    return model, processor


def _qwen_text_config(tok, text_layers: int) -> dict:
    # head_dim = 128 / 4 = 32; M-RoPE sections (temporal, height, width) sum to head_dim / 2 = 16
    return dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=text_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})


def _qwen2_text_config(tok, text_layers: int) -> dict:
    """The same small Qwen2 with 1-D RoPE, as a sub-config (InternVL, LLaVA-OneVision)."""
    text = dict(_qwen_text_config(tok, text_layers), model_type="qwen2")
    text.pop("rope_parameters")
    return text


def _qwen_ids(tok) -> dict:
    ids = {key: tok.convert_tokens_to_ids(t) for key, t in (
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"))}
    assert all(0 <= i < len(tok) for i in ids.values()), ids
    return ids


def _qwen_processor(cls, tok, min_pixels: int, max_pixels: int):
    from transformers import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    return cls(image_processor=image_processor, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)


def _qwen_finish(model, tok):
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def build_tiny_qwen2_vl(vision_layers: int = 6, text_layers: int = 4, min_pixels: int = 56 * 56,
                        max_pixels: int = 224 * 224, attn_implementation: str = "sdpa", seed: int = 0):
    """(model, processor): a ~1M-parameter Qwen2-VL (dynamic resolution, 14 px patches, 2x2 merge, M-RoPE).
    An image resized to H x W (multiples of 28 within [min_pixels, max_pixels]) gives H*W/28^2 visual tokens."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from .processors import Qwen2VLImageOnlyProcessor

    tok = build_qwen_tokenizer()
    vision = dict(depth=vision_layers, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)  # hidden_size = merger output = text hidden
    cfg = Qwen2VLConfig(text_config=_qwen_text_config(tok, text_layers), vision_config=vision, **_qwen_ids(tok))
    model = _qwen_finish(_instantiate(Qwen2VLForConditionalGeneration, cfg, attn_implementation, seed, tok), tok)
    return model, _qwen_processor(Qwen2VLImageOnlyProcessor, tok, min_pixels, max_pixels)


def build_tiny_qwen2_5_vl(vision_layers: int = 6, text_layers: int = 4, min_pixels: int = 56 * 56,
                          max_pixels: int = 224 * 224, attn_implementation: str = "sdpa", seed: int = 0,
                          window_size: int = 112, fullatt_block_indexes: list[int] | None = None):
    """(model, processor): a ~1M-parameter Qwen2.5-VL. Like ``build_tiny_qwen2_vl``, plus window attention in
    the vision tower: windows of ``window_size`` px (8x8 patches) except in ``fullatt_block_indexes`` (default:
    the middle and the last block, e.g. [2, 5] for 6 layers, as the real model ends on a full-attention block).
    Images up to 112x112 px fit in one window; larger ones are split."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from .processors import Qwen2_5_VLImageOnlyProcessor

    if fullatt_block_indexes is None:
        fullatt_block_indexes = sorted({vision_layers // 2 - 1, vision_layers - 1})
    windowed = [i for i in range(vision_layers) if i not in fullatt_block_indexes]
    if not windowed or not fullatt_block_indexes:
        raise ValueError(f"{vision_layers} vision layers with full attention at {fullatt_block_indexes}: "
                         "need both windowed and full-attention blocks")
    tok = build_qwen_tokenizer()
    vision = dict(depth=vision_layers, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=window_size,
                  fullatt_block_indexes=list(fullatt_block_indexes))
    cfg = Qwen2_5_VLConfig(text_config=_qwen_text_config(tok, text_layers), vision_config=vision, **_qwen_ids(tok))
    model = _qwen_finish(_instantiate(Qwen2_5_VLForConditionalGeneration, cfg, attn_implementation, seed, tok), tok)
    return model, _qwen_processor(Qwen2_5_VLImageOnlyProcessor, tok, min_pixels, max_pixels)


def _qwen3_processor(tok, min_pixels: int, max_pixels: int):
    """Qwen3-VL's processor (Qwen3.5 uses it too): 16 px patches, 2x2 merge, image-only."""
    from transformers import Qwen2VLImageProcessorPil

    from .processors import Qwen3VLImageOnlyProcessor

    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=16,
                                               merge_size=2, temporal_patch_size=2)
    return Qwen3VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)


def build_tiny_qwen3_vl(vision_layers: int = 6, text_layers: int = 4, min_pixels: int = 64 * 64,
                        max_pixels: int = 256 * 256, attn_implementation: str = "sdpa", seed: int = 0,
                        deepstack_layers: tuple[int, ...] = (1, 3, 4)):
    """(model, processor): a ~1M-parameter Qwen3-VL: 16 px patches, 2x2 merge, learned positions (an 8x8 table
    resampled per image), interleaved M-RoPE, a Qwen3 language model with q / k norms, and DeepStack: the outputs of
    ViT blocks ``deepstack_layers`` are added after decoder layers 0, 1, 2. An image resized to H x W
    (multiples of 32 within [min_pixels, max_pixels]) gives H*W/32^2 visual tokens."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = build_qwen_tokenizer()
    vision = dict(depth=vision_layers, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=list(deepstack_layers))
    text = _qwen_text_config(tok, text_layers)
    text.update(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 4, 4],
                                              "mrope_interleaved": True})
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tok))
    model = _qwen_finish(_instantiate(Qwen3VLForConditionalGeneration, cfg, attn_implementation, seed, tok), tok)
    return model, _qwen3_processor(tok, min_pixels, max_pixels)


def build_tiny_qwen3_5(vision_layers: int = 6, text_layers: int = 4, min_pixels: int = 64 * 64,
                       max_pixels: int = 256 * 256, attn_implementation: str = "sdpa", seed: int = 0):
    """(model, processor): a ~1M-parameter Qwen3.5: Qwen3-VL's ViT without DeepStack, and a hybrid language model of
    Gated DeltaNet linear-attention layers and one full-attention layer in four (layers 0-2 linear, 3 full at 4
    layers), interleaved M-RoPE on a quarter of each head. The processor is Qwen3-VL's (one token per 32x32 px)."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    tok = build_qwen_tokenizer()
    vision = dict(depth=vision_layers, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)
    text = _qwen_text_config(tok, text_layers)
    text.update(head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                linear_num_key_heads=2, linear_num_value_heads=4, full_attention_interval=4,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                 "mrope_interleaved": True, "partial_rotary_factor": 0.25})
    cfg = Qwen3_5Config(text_config=text, vision_config=vision, **_qwen_ids(tok))
    model = _qwen_finish(_instantiate(Qwen3_5ForConditionalGeneration, cfg, attn_implementation, seed, tok), tok)
    return model, _qwen3_processor(tok, min_pixels, max_pixels)


# InternVL (-hf): Qwen-style chat; an image item is <IMG_CONTEXT>\n, which the processor expands to
# <img><IMG_CONTEXT> x (tokens per tile x tiles)</img>.
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                   "video_token": "<video>"}
INTERNVL_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n").replace(
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>", "")  # images only


def build_internvl_tokenizer():
    """The Qwen byte-level tokenizer with InternVL's named image tokens (``tokenizer.start_image_token`` etc.)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", padding_side="left", extra_special_tokens=dict(INTERNVL_TOKENS))
    tok.add_tokens(["<|im_start|>"] + list(INTERNVL_TOKENS.values()), special_tokens=True)
    return tok


def build_tiny_internvl(tile_size: int = 112, max_tiles: int = 4, vision_layers: int = 6, text_layers: int = 4,
                        attn_implementation: str = "sdpa", seed: int = 0):
    """(model, processor): a ~1M-parameter InternVL (the -hf layout of InternVL3): an InternViT with [CLS] on
    ``tile_size`` px tiles of 14 px patches, dynamic tiling into 1..``max_tiles`` tiles plus a thumbnail when there
    is more than one, pixel shuffle 0.5 (2x2 patches -> one token) before the MLP projector, a Qwen2 language model.
    A tile gives (tile_size / 28)^2 tokens: 16 at 112 px."""
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration

    from .processors import InternVLImageOnlyProcessor

    tok = build_internvl_tokenizer()
    tokens_per_tile = (tile_size // 28) ** 2
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=vision_layers, num_attention_heads=4,
                  image_size=[tile_size, tile_size], patch_size=[14, 14], use_mean_pooling=True)
    text = _qwen2_text_config(tok, text_layers)
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_seq_length=tokens_per_tile,
                         image_token_id=tok.convert_tokens_to_ids(INTERNVL_TOKENS["context_image_token"]),
                         downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default")
    cfg.max_dynamic_patch = max_tiles  # the processor's max_patches, under InternVL's own config name (the adapter reads it)
    model = _qwen_finish(_instantiate(InternVLForConditionalGeneration, cfg, attn_implementation, seed, tok), tok)
    image_processor = GotOcr2ImageProcessorPil(size={"height": tile_size, "width": tile_size}, crop_to_patches=True,
                                               min_patches=1, max_patches=max_tiles)
    processor = InternVLImageOnlyProcessor(image_processor=image_processor, tokenizer=tok,
                                           image_seq_length=tokens_per_tile, chat_template=INTERNVL_CHAT_TEMPLATE)
    return model, processor


# LLaVA-OneVision: Qwen-style chat; an image item is <image>\n, which the processor expands to the image's tokens.
ONEVISION_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>\n").replace(
    "<|vision_start|><|video_pad|><|vision_end|>", "<video>\n")


def build_tiny_onevision(crop_size: int = 112, vision_layers: int = 6, text_layers: int = 4, max_crops: int = 9,
                         attn_implementation: str = "sdpa", seed: int = 0):
    """(model, processor): a ~1M-parameter LLaVA-OneVision: a SigLIP tower without [CLS] on ``crop_size`` px crops of
    14 px patches (64 tokens at 112 px), anyres pinpoints up to 2x2 crops, ``anyres_max_<max_crops>`` downscaling
    (the default 9 never triggers at 2x2; 1 does), a row newline token, "full" features of the last layer, Qwen2."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessorPil, SiglipVisionConfig)

    from .processors import LlavaOnevisionImageOnlyProcessor

    s = crop_size
    pinpoints = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    tok = build_qwen_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS + [IMAGE_TOKEN, "<video>"]})
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=vision_layers,
                                num_attention_heads=4, image_size=s, patch_size=14, vision_use_head=False)
    text = _qwen2_text_config(tok, text_layers)
    ratio = f"anyres_max_{max_crops}"
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                               image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                               video_token_index=tok.convert_tokens_to_ids("<video>"), vision_aspect_ratio=ratio,
                               vision_feature_layer=-1, vision_feature_select_strategy="full")
    model = _qwen_finish(_instantiate(LlavaOnevisionForConditionalGeneration, cfg, attn_implementation, seed, tok), tok)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": s, "width": s}, image_grid_pinpoints=pinpoints)
    processor = LlavaOnevisionImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tok, num_image_tokens=(s // 14) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio=ratio, chat_template=ONEVISION_CHAT_TEMPLATE)
    return model, processor


# name -> (directory name under the cache, builder, kwargs). "tiny"/"tiny-576" keep their historic names; v2 of the
# Qwen and OneVision twins: chat templates with a video item.
TINY_MODELS = {
    "tiny": (f"tiny-llava-{VERSION}", build_tiny_llava, {"image_size": 112}),
    "tiny-576": (f"tiny-llava-{VERSION}-336px", build_tiny_llava, {"image_size": 336}),
    "tiny-next": ("tiny-llava-next-v1", build_tiny_llava_next, {}),
    "tiny-qwen2-vl": ("tiny-qwen2-vl-v2", build_tiny_qwen2_vl, {}),
    "tiny-qwen2.5-vl": ("tiny-qwen2.5-vl-v2", build_tiny_qwen2_5_vl, {}),
    "tiny-internvl": ("tiny-internvl-v1", build_tiny_internvl, {}),
    "tiny-qwen3-vl": ("tiny-qwen3-vl-v2", build_tiny_qwen3_vl, {}),
    "tiny-onevision": ("tiny-onevision-v2", build_tiny_onevision, {}),
    "tiny-qwen3.5": ("tiny-qwen3.5-v2", build_tiny_qwen3_5, {}),
}


def _complete(path: Path) -> bool:
    return (path / "config.json").exists() and (path / "processor_config.json").exists()


def tiny_model_dir(name: str = "tiny", cache_dir: str | os.PathLike | None = None) -> Path:
    """A saved tiny model (weights + processor) named ``name``, built once and cached under ``cache_dir``
    (default ``$PRUNEKIT_CACHE`` or ~/.cache/prunekit). Names: ``tiny`` (LLaVA-1.5, 112 px, 64 visual
    tokens), ``tiny-576`` (LLaVA-1.5, 336 px, 576), ``tiny-next`` (LLaVA-NeXT), ``tiny-qwen2-vl``,
    ``tiny-qwen2.5-vl``, ``tiny-internvl``, ``tiny-qwen3-vl``, ``tiny-onevision``, ``tiny-qwen3.5``."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(TINY_MODELS)}")
    dirname, builder, kwargs = TINY_MODELS[name]
    return _cached(cache_root(cache_dir) / dirname, lambda: builder(**kwargs))


def tiny_llava_dir(cache_dir: str | os.PathLike | None = None, image_size: int = 112) -> Path:
    """A saved tiny LLaVA-1.5 (weights + processor), built once and cached on disk.

    ``image_size`` 112 gives 64 visual tokens (the default, ``tiny``); 336 gives LLaVA-1.5's 576
    (``tiny-576``), so the papers' 64/128/192-token budgets mean what they mean on a real model.
    """
    path = cache_root(cache_dir) / (f"tiny-llava-{VERSION}" + ("" if image_size == 112 else f"-{image_size}px"))
    return _cached(path, lambda: build_tiny_llava(image_size=image_size))


def _cached(path: Path, build) -> Path:
    """``path``, first written from ``build()`` -> (model, processor) if it is not complete (``cache.build_once``)."""
    def write(tmp):
        model, processor = build()
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    return build_once(path, _complete, write, "config.json or processor_config.json")


def synthetic_image(seed: int, size: int | tuple[int, int] = 112) -> Image.Image:
    """A reproducible picture: a few coloured rectangles on a noisy background.
    ``size`` is the side of a square, or (width, height) for a non-square picture."""
    if not isinstance(size, int):
        return _synthetic_image_wh(seed, *size)
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    for _ in range(3):
        y0, x0 = rng.integers(0, size - 16, 2)
        h, w = rng.integers(12, size // 2, 2)
        img[y0 : y0 + h, x0 : x0 + w] = rng.integers(80, 256, 3, dtype=np.uint8)
    return Image.fromarray(img)


def build_tiny_clip_text(vision_width: int = 64, seed: int = 0):
    """A random ``CLIPModel`` whose vision width matches the tiny LLaVA towers (64), with a byte-level tokenizer
    (``<|startoftext|>`` / ``<|endoftext|>`` around every text): CDPruner's text encoder in tests. Returns
    (model, tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    bos, eos = len(vocab), len(vocab) + 1
    vocab |= {"<|startoftext|>": bos, "<|endoftext|>": eos}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", model_max_length=77)
    text = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                          pad_token_id=eos, projection_dim=32)
    vision = CLIPVisionConfig(hidden_size=vision_width, intermediate_size=128, num_hidden_layers=1,
                              num_attention_heads=4, image_size=112, patch_size=14, projection_dim=32)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32)).eval()
    return model, tok


def tiny_clip_text_dir(cache_dir: str | os.PathLike | None = None, vision_width: int = 64) -> Path:
    """A saved tiny random CLIP (text encoder, projections, tokenizer) matching a tower of ``vision_width``: the tiny
    LLaVA towers' 64 by default (CDPruner in tests; the speed benchmark asks for its shapes' widths)."""
    def write(tmp):
        model, tok = build_tiny_clip_text(vision_width)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    name = "tiny-clip-text-v1" + ("" if vision_width == 64 else f"-w{vision_width}")
    return build_once(cache_root(cache_dir) / name, lambda p: (p / "tokenizer.json").exists(), write, "tokenizer.json")


def _synthetic_image_wh(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    for _ in range(3):
        y0, x0 = rng.integers(0, height - 16), rng.integers(0, width - 16)
        h, w = rng.integers(12, height // 2), rng.integers(12, width // 2)
        img[y0 : y0 + h, x0 : x0 + w] = rng.integers(80, 256, 3, dtype=np.uint8)
    return Image.fromarray(img)

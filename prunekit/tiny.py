"""Tiny random-weight LLaVA-1.5 with an offline processor: the embedded default and the test model.

No hub access: the tokenizer vocabulary, image processor and chat template are built in memory and
saved next to the weights, so ``from_pretrained(path)`` exercises the same loading code as a real
checkpoint. A random-weight model's answers are meaningless; use it for mechanics and fidelity.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
VERSION = "v2"  # bump when the recipe changes, so cached copies are rebuilt


def build_tokenizer():
    from transformers import LlamaTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789?!:;.,'-\n▁")
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + chars)}
    tok = LlamaTokenizer(vocab=vocab, merges=[], padding_side="left")
    tok.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def build_tiny_llava(image_size: int = 112, patch_size: int = 14, vision_layers: int = 6, text_layers: int = 4,
                     attn_implementation: str = "sdpa", seed: int = 0):
    """(model, processor): a ~1M-parameter LLaVA-1.5 with (image_size/patch_size)^2 visual tokens."""
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = build_tokenizer()
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=text_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=vision_layers,
                              num_attention_heads=4, image_size=image_size, patch_size=patch_size, projection_dim=64)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                      image_seq_length=(image_size // patch_size) ** 2, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    return model, processor


def tiny_llava_dir(cache_dir: str | os.PathLike | None = None, image_size: int = 112) -> Path:
    """A saved tiny LLaVA (weights + processor), built once and cached on disk.

    ``image_size`` 112 gives 64 visual tokens (the default); 336 gives LLaVA-1.5's 576, so the papers'
    64/128/192-token budgets mean what they mean on a real model.
    """
    root = Path(cache_dir or os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))
    path = root / (f"tiny-llava-{VERSION}" + ("" if image_size == 112 else f"-{image_size}px"))
    if not (path / "config.json").exists() or not (path / "processor_config.json").exists():
        model, processor = build_tiny_llava(image_size=image_size)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        tmp.replace(path) if not path.exists() else None
    return path


def synthetic_image(seed: int, size: int = 112) -> Image.Image:
    """A reproducible picture: a few coloured rectangles on a noisy background."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    for _ in range(3):
        y0, x0 = rng.integers(0, size - 16, 2)
        h, w = rng.integers(12, size // 2, 2)
        img[y0 : y0 + h, x0 : x0 + w] = rng.integers(80, 256, 3, dtype=np.uint8)
    return Image.fromarray(img)

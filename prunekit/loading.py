"""Load a VLM and its processor from a local directory or hub id, failing fast on paths that are not there."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .compat import LOAD_KWARGS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# embedded random-weight models (prunekit.tiny.TINY_MODELS), built once and cached:
# LLaVA-1.5 at 112 px (64 visual tokens) and 336 px (576), LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, InternVL, Qwen3-VL, LLaVA-OneVision and Qwen3.5
TINY = ("tiny", "tiny-576", "tiny-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-internvl", "tiny-qwen3-vl",
        "tiny-onevision", "tiny-qwen3.5")


def resolve_model_path(path: str | None) -> str:
    """``"pocket"``: the shipped trained pocket VLM (docs/pocket.md); ``None``/``"tiny"`` (LLaVA-1.5, 64 visual tokens), ``"tiny-576"`` (LLaVA-1.5's 576), ``"tiny-next"``,
    ``"tiny-qwen2-vl"``, ``"tiny-qwen2.5-vl"``, ``"tiny-internvl"``, ``"tiny-qwen3-vl"``, ``"tiny-onevision"``, ``"tiny-qwen3.5"``: an embedded tiny model, built once and cached (``"tiny-clip-text"``:
    the CLIP text encoder matching the tiny LLaVA towers); anything else:
    a local directory or a hub id."""
    if path == "pocket":
        from .pocket.model import pocket_model_dir

        return str(pocket_model_dir())
    if path == "tiny-clip-text":  # the CLIP text encoder matching the tiny LLaVA towers (CDPruner's relevance)
        from .tiny import tiny_clip_text_dir

        return str(tiny_clip_text_dir())
    if path in (None, "") or path in TINY:
        from .tiny import tiny_model_dir

        return str(tiny_model_dir(path or "tiny"))
    local = Path(os.path.expanduser(path))
    if local.exists():
        if not (local / "config.json").exists():
            raise FileNotFoundError(f"model directory {local} has no config.json; point model.path at a "
                                    "directory written by save_pretrained (or at a hub id like llava-hf/llava-1.5-7b-hf)")
        return str(local)
    looks_local = path.startswith(("/", "./", "../", "~")) or path.count("/") != 1
    if looks_local:
        raise FileNotFoundError(f"model path {path!r} does not exist. Give model.path= an existing local "
                                "directory or a hub id of the form org/name (e.g. llava-hf/llava-1.5-7b-hf).")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "config.json"), str):
            raise FileNotFoundError(f"{path!r} is not in the local hub cache and HF_HUB_OFFLINE is set; download it "
                                    "on a machine with access (huggingface-cli download) or give a local directory")
    return path


def load_processor(path: str, model_type: str | None = None):
    """The processor saved at ``path`` (a resolved directory or hub id).

    ``AutoProcessor`` everywhere it can build the family's processor. Qwen2-VL / Qwen2.5-VL processors need a
    video processor, which needs torchvision: without it ``AutoProcessor`` returns only the tokenizer (or
    raises), so those load with the image-only subclasses of ``prunekit.processors`` instead; a directory
    saved from one of those subclasses (the tiny Qwen models) always loads with it.
    """
    from transformers import AutoConfig, AutoProcessor

    from .processors import IMAGE_ONLY_PROCESSORS

    if model_type is None:
        model_type = AutoConfig.from_pretrained(path).model_type
    image_only = IMAGE_ONLY_PROCESSORS.get(model_type)  # qwen2_vl, qwen2_5_vl
    if image_only is None:
        return AutoProcessor.from_pretrained(path)
    if _saved_processor_class(path) == image_only.__name__:
        return image_only.from_pretrained(path)  # AutoProcessor cannot find our class by name
    try:
        processor = AutoProcessor.from_pretrained(path)
    except Exception:  # no torchvision: 5.23 raises AttributeError, 5.17 TypeError (the video processor)
        processor = None
    if getattr(processor, "image_processor", None) is None:
        processor = image_only.from_pretrained(path)
    return processor


def _saved_processor_class(path: str) -> str | None:
    config = Path(path) / "processor_config.json"
    if not config.is_file():
        return None
    with open(config, encoding="utf-8") as f:
        return json.load(f).get("processor_class")


def load_model(path: str | None, dtype: str = "float32", attn_implementation: str = "sdpa"):
    """(model in eval mode, processor with left padding for batched generation)."""
    from transformers import AutoModelForImageTextToText

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    resolved = resolve_model_path(path)
    model = AutoModelForImageTextToText.from_pretrained(
        resolved, dtype=DTYPES[dtype], attn_implementation=attn_implementation, **LOAD_KWARGS
    ).eval()
    processor = load_processor(resolved, model.config.model_type)
    processor.tokenizer.padding_side = "left"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor

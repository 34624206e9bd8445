"""Load a VLM and its processor from a local directory or hub id, failing fast on paths that are not there."""
from __future__ import annotations

import os
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


TINY = {"tiny": 112, "tiny-576": 336}  # embedded random-weight models: name -> image size (64 / 576 tokens)


def resolve_model_path(path: str | None) -> str:
    """``None``/``"tiny"`` (64 visual tokens) or ``"tiny-576"`` (LLaVA-1.5's 576): an embedded tiny model,
    built once and cached; anything else: a local directory or a hub id."""
    if path in (None, "") or path in TINY:
        from ..tiny import tiny_llava_dir

        return str(tiny_llava_dir(image_size=TINY[path or "tiny"]))
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


def load_model(path: str | None, dtype: str = "float32", attn_implementation: str = "sdpa"):
    """(model in eval mode, processor with left padding for batched generation)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    resolved = resolve_model_path(path)
    model = AutoModelForImageTextToText.from_pretrained(
        resolved, dtype=DTYPES[dtype], attn_implementation=attn_implementation
    ).eval()
    processor = AutoProcessor.from_pretrained(resolved)
    processor.tokenizer.padding_side = "left"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor

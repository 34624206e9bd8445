"""Every served stage runs in bf16 and fp16 without NaN, with honest counts, through generate."""
import pytest
import torch
from transformers import AutoModelForImageTextToText

import prunekit
from prunekit import Site
from helpers import Recorder, batch
from prunekit.compat import LOAD_KWARGS

SPECS = [
    dict(name="keep_all"),
    dict(name="random", budget=16, stage="projector_output"),
    dict(name="pooling", budget=16),
    dict(name="random", budget=16, stage="vision_layer", layer=1),
    dict(name="pooling", budget=16, stage="vision_layer", layer=0),
    dict(name="flowcut", budget=16),
    dict(name="random", budget=16, stage="llm_layer", layer=1),
    dict(name="pooling", budget=4, stage="llm_layer", layer=2),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_all_stages_in_half_precision(tiny_dir, processor, dtype):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, **LOAD_KWARGS, dtype=dtype).eval()
    x = batch(processor, [0, 1, 2])
    x["pixel_values"] = x["pixel_values"].to(dtype)
    for spec in SPECS:
        with prunekit.attach(model, spec) as h:
            logits = model(**x).logits
            assert logits.dtype == dtype and torch.isfinite(logits).all(), spec
            expected = spec.get("budget", 64)
            assert h.trace.n_final == [expected] * 3, spec
            out = model.generate(**x, max_new_tokens=3, do_sample=False, min_new_tokens=3)
            assert out.shape[1] == x["input_ids"].shape[1] + 3
    # signals after a ragged cut in the encoder, and in the language model
    recorder = Recorder([Site("vision_layer", 1), Site("llm_layer", 2)], cut=Site("vision_layer", 0))
    with prunekit.attach(model, recorder):
        assert torch.isfinite(model(**x).logits).all()
        model.generate(**x, max_new_tokens=2, do_sample=False)
    for seen in recorder.seen.values():
        for rows in seen["rows"].values():
            assert rows.dtype == torch.float32 and torch.isfinite(rows).all()
        assert torch.isfinite(seen["values"]).all() and seen["values"].dtype == dtype


FAMILY_SPECS = [dict(name="keep_all"), dict(name="random", budget=8, stage="vision_layer", layer=1),
                dict(name="flowcut", budget=8), dict(name="fastv", budget=8, layer=2)]


@pytest.mark.heavy
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", ["llava-next", "qwen2-vl", "qwen2.5-vl", "internvl", "qwen3-vl", "llava-onevision",
                                    "qwen3.5"])
def test_every_family_prunes_in_half_precision(family, dtype):
    """Each family's tiny twin in bf16 / fp16, a left-padded batch of two image sizes: a cut in the ViT, FlowCut's
    stages and an LLM cut give finite logits of that dtype, the trace's counts, and generate runs on the pruned cache."""
    from prunekit import tiny
    from helpers import prompt

    build = {"llava-next": tiny.build_tiny_llava_next, "qwen2-vl": tiny.build_tiny_qwen2_vl,
             "qwen2.5-vl": tiny.build_tiny_qwen2_5_vl, "internvl": tiny.build_tiny_internvl,
             "qwen3-vl": tiny.build_tiny_qwen3_vl, "llava-onevision": tiny.build_tiny_onevision,
             "qwen3.5": tiny.build_tiny_qwen3_5}[family]
    model, processor = build()
    model = model.to(dtype)
    processor.tokenizer.padding_side = "left"
    texts = [prompt(processor, q) for q in ("what is it?", "is there a red box in the picture?")]
    images = [tiny.synthetic_image(1, (224, 224)), tiny.synthetic_image(2, (112, 224))]
    x = processor(images=images, text=texts, return_tensors="pt", padding=True)
    x["pixel_values"] = x["pixel_values"].to(dtype)
    specs = FAMILY_SPECS if family != "qwen3.5" else [  # its hybrid LM takes no cut
        s for s in FAMILY_SPECS if s["name"] != "fastv"] + [dict(name="random", budget=8, stage="projector_output")]
    for spec in specs:
        with torch.no_grad(), prunekit.attach(model, spec) as h:
            logits = model(**x).logits
            assert logits.dtype == dtype and torch.isfinite(logits).all(), spec
            t = h.trace
            assert all(0 < f <= v for f, v in zip(t.n_final, t.n_vanilla)), spec
            if spec["name"] != "keep_all":
                assert all(f < v for f, v in zip(t.n_final, t.n_vanilla)), spec
            out = model.generate(**x, max_new_tokens=2, min_new_tokens=2, do_sample=False)
            assert out.shape[1] == x["input_ids"].shape[1] + 2

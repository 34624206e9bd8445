"""On a CUDA device (skipped elsewhere; `python scripts/gpu_check.py` runs them): the runtime contract in bf16 and
fp32 on the GPU, for the strategies of the GPU speed table and the newer methods, and the 7B speed shapes built
directly on the GPU."""
import pytest
import torch

import prunekit
from prunekit.loading import load_model
from prunekit.tiny import synthetic_image, tiny_clip_text_dir, tiny_model_dir
from helpers import QUESTIONS, prompt

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SPECS = {"flowcut": {}, "fastv": {"layer": 2}, "visionzip": {}, "vispruner": {}, "mmtok": {},
         "cdpruner": {"text_encoder": None}}  # cdpruner's tiny CLIP is filled in below (LLaVA towers only)


def inputs(processor, indices, device):
    texts = [prompt(processor, QUESTIONS[i % len(QUESTIONS)]) for i in indices]
    images = [synthetic_image(100 + i, (224, 112) if i % 2 else (112, 112)) for i in indices]
    return processor(images=images, text=texts, return_tensors="pt", padding=True).to(device)


@pytest.fixture(scope="module", params=["tiny", "tiny-next", "tiny-qwen2-vl"])
def family(request):
    model, processor = load_model(str(tiny_model_dir(request.param)))
    return request.param, model.to("cuda"), processor


def spec(name, family_name, budget):
    knobs = dict(SPECS[name], budget=budget)
    if name == "cdpruner":
        knobs["text_encoder"] = str(tiny_clip_text_dir())
    return {"name": name, **knobs}


def test_keep_all_is_vanilla_on_the_gpu(family):
    _, model, processor = family
    x = inputs(processor, [0, 1], "cuda")
    with torch.no_grad():
        vanilla = model(**x).logits
        with prunekit.attach(model, "keep_all"):
            kept = model(**x).logits
    torch.testing.assert_close(kept, vanilla, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strategies_prune_and_a_padded_batch_keeps_each_rows_tokens(family, name, dtype):
    family_name, model, processor = family
    model.to(dtype)
    try:
        try:
            handle = prunekit.attach(model, spec(name, family_name, 8), processor=processor)
        except prunekit.UnsupportedModelError:
            pytest.skip(f"{name} does not run on {family_name}")
        x = inputs(processor, [0, 1], "cuda")
        with torch.no_grad(), handle:
            out = model.generate(**x, max_new_tokens=3, do_sample=False)
            trace = handle.trace
            assert all(0 < f < v for f, v in zip(trace.n_final, trace.n_vanilla)) and out.shape[0] == 2
            kept = [trace.kept_positions(b).cpu() for b in range(2)]
            for b in range(2 if dtype == torch.float32 else 0):  # bf16 kernels may break near-ties differently
                model(**inputs(processor, [b], "cuda"))
                assert torch.equal(handle.trace.kept_positions(0).cpu(), kept[b])
    finally:
        model.to(torch.float32)


def test_cache_equals_recompute_on_the_gpu(family):
    family_name, model, processor = family
    x = inputs(processor, [0, 1], "cuda")
    with torch.no_grad(), prunekit.attach(model, "fastv", budget=8, layer=2) as h:
        out = model.generate(**x, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        new = out.sequences[:, x["input_ids"].shape[1]:]
        with h.replay():
            ids = torch.cat([x["input_ids"], new[:, :-1]], 1)
            mask = torch.cat([x["attention_mask"], torch.ones_like(new[:, :-1])], 1)
            rest = {k: v for k, v in x.items() if k not in ("input_ids", "attention_mask")}
            if "mm_token_type_ids" in rest:
                rest["mm_token_type_ids"] = torch.cat([rest["mm_token_type_ids"], torch.zeros_like(new[:, :-1])], 1)
            else:
                rest["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **rest).logits[:, -1]
    torch.testing.assert_close(logits, out.logits[-1], rtol=1e-4, atol=1e-4)


def test_the_7b_speed_shape_is_built_on_the_gpu():
    from prunekit.bench.shapes import build

    shape = build("llava15_7b", "cuda", torch.bfloat16)
    assert {p.device.type for p in shape.model.parameters()} == {"cuda"}
    x = shape.inputs(1)
    with torch.no_grad():
        assert shape.model(**x, logits_to_keep=1).logits.shape[:2] == (1, 1)

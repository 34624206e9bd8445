"""The speed benchmark's machinery (experiments/bench.py): shapes, the oracle floor, timing, the runner.
Numbers are not asserted (timed unit tests would be flaky); what each measurement runs is."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit.bench.measure import Clock, ScoringTimer, median_interval
from prunekit.bench.oracle import oracle_prefill, schedule
from prunekit.bench.runner import markdown, run
from prunekit.bench.shapes import build

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llava():
    return build("llava15_tiny")


def test_median_interval_is_the_binomial_order_statistics():
    """95 % interval of a median from order statistics, worked out from Binomial(n, 1/2):
    n = 10: P(X < 2) = 11/1024 = 0.011 <= 0.025 < P(X < 3) = 56/1024 -> the 2nd and 9th values;
    n = 20: P(X < 6) = 21700/2^20 = 0.021 <= 0.025 < P(X < 7) = 60460/2^20 -> the 6th and 15th;
    n = 6: P(X < 1) = 1/64 -> min and max; n = 5: P(X < 1) = 1/32 > 0.025 -> no interval."""
    ten = [7.0, 3.0, 10.0, 1.0, 5.0, 9.0, 2.0, 8.0, 6.0, 4.0]
    assert median_interval(ten) == [2.0, 9.0]
    assert median_interval([float(v) for v in range(20, 0, -1)]) == [6.0, 15.0]
    assert median_interval([3.0, 1.0, 2.0, 6.0, 5.0, 4.0]) == [1.0, 6.0]
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None


@pytest.mark.parametrize("name", ["llava15_tiny", "internvl_tiny"])
def test_oracle_with_every_token_is_the_model_itself(llava, name):
    """InternVL: the tiles' full grids through the model's own pixel shuffle, then the projector."""
    shape = llava if name == "llava15_tiny" else build(name)
    x = shape.inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(oracle_prefill(shape.model, x, None), shape.model(**x).logits[:, -1],
                                   rtol=1e-5, atol=1e-5)


def test_internvl_oracle_restores_each_tiles_grid_after_a_vit_cut():
    """A cut inside InternViT keeps whole 2x2 groups; the oracle runs the ViT on the recorded counts, then pads each
    tile back to its 8x8 grid for the shuffle and projects the recorded number of tokens."""
    shape = build("internvl_tiny")
    x = shape.inputs(1)
    with torch.no_grad(), prunekit.attach(shape.model, dict(name="random", budget=52, stage="vision_layer",
                                                            layer=1)) as h:
        shape.model(**x)
    plan = schedule(h.trace)
    seen = []
    hook = shape.model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    try:
        logits = oracle_prefill(shape.model, x, plan)
    finally:
        hook.remove()
    # per tile: 52 // 13 (the most tiles, 12, + thumbnail) = 4 tokens = 16 patches after layer 1, in each of 13 tiles
    assert plan["vision"][:2] == [64, 64] and plan["vision"][2:] == [16] * 4 and plan["projector"] == 4
    assert seen == [torch.Size([13, 4, 4 * 64])] and torch.isfinite(logits).all()


@pytest.mark.parametrize("spec", [dict(name="flowcut", budget=16), dict(name="fastv", budget=16, layer=2),
                                  dict(name="pdrop", budget=16, convention="n_final", layer_list=[1, 2, 3])])
def test_oracle_runs_the_recorded_schedule(llava, spec):
    """Every encoder and decoder layer of the oracle sees the token count the pruned prefill gave it."""
    x = llava.inputs(2)
    with torch.no_grad(), prunekit.attach(llava.model, spec) as h:
        llava.model(**x)
    t, adapter = h.trace, h.adapter
    plan = schedule(t)
    seen = {"vision": [], "llm": []}
    hooks = [layer.register_forward_pre_hook(lambda m, a, k, key=key: seen[key].append(a[0].shape[1]), with_kwargs=True)
             for key, layers in (("vision", adapter.vision_layers), ("llm", adapter.decoder_layers)) for layer in layers]
    try:
        oracle_prefill(llava.model, x, plan)
    finally:
        for hook in hooks:
            hook.remove()
    text = x["input_ids"].shape[1] - t.n_vanilla[0]
    assert seen["llm"] == [text + int(c) for c in t.llm_layer_counts[0]]
    assert seen["vision"] == [1 + int(c) for c in t.vision_layer_counts[0]]  # [CLS] + the patches


def test_scoring_timer_times_the_strategy_and_restores_it(llava):
    x = llava.inputs(1)
    with torch.no_grad(), prunekit.attach(llava.model, "fastv", budget=16, layer=2) as h:
        prune = h.strategy.prune
        timer = ScoringTimer(h, Clock(torch.device("cpu")))
        llava.model(**x)
        assert timer.take_ms() > 0 and timer.take_ms() == 0
        timer.remove()
        assert h.strategy.prune == prune and "prune" not in vars(h.strategy)
        assert "_capture" not in vars(h.probe)


def test_runner_rows_oracle_reference_style_and_refusals(tmp_path):
    rows = run(["llava15_tiny", "qwen2_vl_tiny"], [2], ["flowcut", "fastv", "visionzip"],
               {"llava15": [16], "qwen2_vl": [16]}, "cpu", torch.float32, repeats=1, warmup=0, new_tokens=2, out=tmp_path)
    by = {(r["shape"], r["strategy"]): r for r in rows}
    assert set(by) == {(s, k) for s in ("llava15_tiny", "qwen2_vl_tiny") for k in ("vanilla", "flowcut", "fastv", "visionzip")}
    assert "[CLS]" in by["qwen2_vl_tiny", "visionzip"]["refused"]
    flowcut = by["llava15_tiny", "flowcut"]
    assert flowcut["n_final"] == 16 and flowcut["flops_ratio"] > 1
    for key in ("prefill_ms", "oracle_ms", "pruned_over_oracle", "scoring_share", "speedup", "generate_ms",
                "decode_tokens_per_s", "reference_ms", "reference_over_prunekit"):
        assert flowcut[key] is not None and flowcut[key] > 0, key
    assert "reference_ms" not in by["llava15_tiny", "visionzip"] or by["llava15_tiny", "visionzip"]["reference_ms"] > 0
    assert by["llava15_tiny", "vanilla"]["speedup"] == 1.0
    assert flowcut["pruned_over_oracle_ci"] is None  # one round: too few for a 95 % interval of the median
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["strategy"] for line in lines] == [r["strategy"] for r in rows]
    table = markdown(rows)
    assert table.count("\n| llava15_tiny |") == 4 and "qwen2_vl_tiny b2 visionzip@16" in table


def test_reference_style_restores_the_attention_implementation(llava):
    from prunekit.bench.runner import _reference_style

    adapter = prunekit.adapter_for(llava.model)
    with _reference_style(llava.model, adapter, "vision"):
        assert llava.model.config.vision_config._attn_implementation == "eager"
    assert llava.model.config.vision_config._attn_implementation == "sdpa"
    assert not adapter.vision_tower._forward_pre_hooks


def test_cli_writes_results(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "bench.py"), "shapes=[llava15_tiny]", "batch_sizes=[1]",
         "strategies=[random]", "budgets.llava15=[16]", "repeats=1", "warmup=0", "new_tokens=2",
         f"output_dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "results.md").read_text().count("| llava15_tiny |") == 2
    assert "torch" in (tmp_path / "config.yaml").read_text()


@pytest.mark.parametrize("name,params,tokens", [("llava15_7b", 7.06e9, 576), ("llava_next_7b", 7.06e9, 2928),
                                                ("qwen2_vl_7b", 8.29e9, 576), ("qwen3_vl_8b", 8.77e9, 576),
                                                ("llava_onevision_7b", 8.03e9, 7371), ("internvl_8b", 7.94e9, 3328)])
def test_7b_shapes_are_the_published_architectures(name, params, tokens):
    """Built on the meta device (no memory): the parameter counts of LLaVA-1.5-7B, LLaVA-NeXT-7B, Qwen2-VL-7B,
    Qwen3-VL-8B (8,767,123,696 on its model card), LLaVA-OneVision-7B (8.03 B) and InternVL3-8B (7.94 B). OneVision's
    image is 3x3 crops + base: 729 + 81 x 82 = 7,371 tokens, the largest grid anyres_max_9 keeps undownscaled;
    InternVL's is the most tiles, 12 + the thumbnail, 256 tokens each."""
    shape = build(name, device="meta", dtype=torch.bfloat16)
    assert sum(p.numel() for p in shape.model.parameters()) == pytest.approx(params, rel=2e-3)
    assert shape.visual_tokens == tokens
    assert shape.inputs(2)["input_ids"].shape == (2, tokens + 40 + (2 if name.startswith(("qwen", "internvl")) else 0) + 1)


def test_qwen3_vl_oracle_runs_the_deepstack_mergers_on_the_recorded_schedule():
    """The oracle floor of Qwen3-VL runs each DeepStack merger on the merge groups alive at its block (a ViT cut after
    block 2 leaves blocks 3 and 4 the kept groups), and every decoder layer on the recorded count."""
    shape = build("qwen3_vl_tiny")
    x = shape.inputs(1)
    spec = dict(name="random", budget=16, stage="vision_layer", layer=2)
    with torch.no_grad(), prunekit.attach(shape.model, spec) as h:
        shape.model(**x)
    t, adapter = h.trace, h.adapter
    seen = {"merger": [], "llm": []}
    hooks = [m.register_forward_pre_hook(lambda m, a: seen["merger"].append(a[0].shape[0]))
             for _, m in adapter.injection_projectors]
    hooks += [layer.register_forward_pre_hook(lambda m, a: seen["llm"].append(a[0].shape[1])) for layer in adapter.decoder_layers]
    try:
        oracle_prefill(shape.model, x, schedule(t))
    finally:
        for hook in hooks:
            hook.remove()
    patches = t.vision_layer_counts[0].tolist()  # 256 into blocks 0-2, 64 (16 groups) from block 3 on
    assert patches[:3] == [256] * 3 and patches[3:] == [64] * 3
    assert seen["merger"] == [256, 64, 64]  # blocks 1, 3, 4
    text = x["input_ids"].shape[1] - t.n_vanilla[0]
    assert seen["llm"] == [text + 16] * 4

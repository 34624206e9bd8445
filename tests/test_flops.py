"""Analytic FLOPs: the spec's worked LLaVA-1.5-7B numbers and an exact match with torch's FLOP counter."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import prunekit
from prunekit.flops import FlopsModel, fastv_layer_macs, trace_flops
from helpers import batch
from prunekit.compat import LOAD_KWARGS


def llava15_7b_on_meta():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, vision_feature_layer=-2)
    with torch.device("meta"):
        return LlavaForConditionalGeneration(cfg)


def test_fastv_convention_reproduces_the_spec_numbers():
    # docs/evaluation.md (efficiency conventions): LLaVA-1.5-7B (T=32, d=4096, m=11008), 576 image + 95 text tokens
    d, m, T, text = 4096, 11008, 32, 95
    full = T * fastv_layer_macs(576 + text, d, m)
    assert full / 1e12 == pytest.approx(3.50, abs=0.005)
    k2 = (2 * fastv_layer_macs(671, d, m) + 30 * fastv_layer_macs(text + 288, d, m)) / full
    k3 = (3 * fastv_layer_macs(671, d, m) + 29 * fastv_layer_macs(text + 288, d, m)) / full
    pre64 = T * fastv_layer_macs(text + 64, d, m) / full
    assert (round(k2, 3), round(k3, 3), round(pre64, 3)) == (0.590, 0.604, 0.231)


def test_exact_count_of_llava15_7b_reads_the_real_shapes():
    flops = FlopsModel.from_model(llava15_7b_on_meta())
    # a gated FFN counts 3 matrices: 4nd^2 + 2n^2 d + 3ndm per layer = 4.46 T for 671 tokens (docs/evaluation.md)
    llm = flops.prefill(95, [576] * 32)
    assert llm["exact_llm"] / 1e12 == pytest.approx(4.46, abs=0.005)
    assert llm["fastv"] / 1e12 == pytest.approx(3.50, abs=0.005)
    # the vision side by hand: 24 CLIP layers over 577 tokens (4 d^2 + 2 d m per token, 2 n^2 d attention),
    # the 14x14x3 patch embedding for 576 patches, a 1024->4096->4096 projector for 576 tokens
    n, dv, mv = 577, 1024, 4096
    vision = 24 * (n * (4 * dv * dv + 2 * dv * mv) + 2 * n * n * dv) + 576 * 14 * 14 * 3 * dv
    projector = 576 * (1024 * 4096 + 4096 * 4096)
    full = flops.prefill(95, [576] * 32, images=1, patches_per_image=576)
    assert full["exact_vision"] == pytest.approx(vision + projector, rel=1e-12)
    assert full["exact"] == pytest.approx(full["exact_vision"] + full["exact_llm"] + 4096 * 32064, rel=1e-12)


@pytest.mark.parametrize("strategy", [None, ("random", {"budget": 16}), ("flowcut", {"budget": 16}),
                                      ("random", {"budget": 16, "stage": "llm_layer", "layer": 2}),
                                      ("random", {"budget": 16, "stage": "projector_output"})])
def test_exact_count_equals_torch_flop_counter(tiny_dir, strategy):
    """Every matmul of an eager prefill, counted by torch, equals the analytic count from the trace."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, **LOAD_KWARGS, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(tiny_dir)
    inputs = batch(processor, [0])
    flops = FlopsModel.from_model(model)
    counter = FlopCounterMode(display=False)
    name, knobs = strategy or ("keep_all", {})
    with prunekit.attach(model, name, **knobs) as handle, counter:
        model(**inputs, logits_to_keep=1)
    text_tokens = int(inputs["attention_mask"].sum()) - handle.trace.n_vanilla[0]
    # torch counts 2 FLOPs per multiply-accumulate; transformers 5.17 builds the RoPE table with a (tiny) matmul
    rope = sum(sum(ops.values()) for module, ops in counter.get_flop_counts().items() if module.endswith("rotary_emb"))
    counted_macs = (counter.get_total_flops() - rope) / 2
    analytic = trace_flops(flops, handle.trace, 0, text_tokens)["exact"]
    if name == "flowcut":  # its score rows (relay . keys, relay value . values) are scoring overhead, not model FLOPs
        assert 0 < counted_macs - analytic < 1e-3 * analytic
    else:
        assert analytic == counted_macs


def counted_and_analytic(model, inputs, name, knobs):
    """(torch's MACs of an eager prefill under the strategy, the analytic count off its trace), less the RoPE
    tables' (tiny) matmuls, which transformers 5.17 computes with one."""
    flops = FlopsModel.from_model(model)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), prunekit.attach(model, name, **knobs) as handle, counter:
        model(**inputs, logits_to_keep=1)
    text_tokens = int(inputs["attention_mask"].sum()) - handle.trace.n_vanilla[0]
    rope = sum(sum(ops.values()) for module, ops in counter.get_flop_counts().items() if module.endswith("rotary_emb"))
    return (counter.get_total_flops() - rope) / 2, trace_flops(flops, handle.trace, 0, text_tokens)["exact"], handle


@pytest.mark.parametrize("strategy", [("keep_all", {}), ("random", {"budget": 8, "stage": "projector_output"})])
def test_exact_count_of_a_sample_with_two_images_of_different_sizes(strategy):
    """Qwen2-VL, one sample with a 224x224 image (256 patches) and a 112x224 one (128): the encoder attends within each
    image, so the n² terms are 256² + 128², not twice the mean image's; torch's count of an eager prefill agrees."""
    from prunekit.tiny import build_tiny_qwen2_vl, synthetic_image

    model, processor = build_tiny_qwen2_vl(attn_implementation="eager")
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "what differs?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[synthetic_image(1, (224, 224)), synthetic_image(2, (224, 112))], text=[text],
                       return_tensors="pt")
    assert inputs["image_grid_thw"].prod(-1).tolist() == [256, 128]
    counted, analytic, handle = counted_and_analytic(model, inputs, *strategy)
    assert handle.trace.unit_tokens == [[64, 32]]
    assert analytic == counted


@pytest.mark.parametrize("strategy", [("keep_all", {}), ("random", {"budget": 8, "stage": "vision_layer", "layer": 2}),
                                      ("random", {"budget": 8, "stage": "projector_output"})])
def test_exact_count_of_qwen3_vl_counts_the_deepstack_mergers(strategy):
    """Qwen3-VL: torch's count of an eager prefill equals the analytic one, whose vision side includes the three
    DeepStack mergers (256 -> 256 -> 128: 98,304 MACs per merged token), each over the groups alive at the block it
    reads; a cut after block 2 leaves block 1's merger every group and blocks 3 and 4's the kept ones."""
    from prunekit.tiny import build_tiny_qwen3_vl, synthetic_image
    from helpers import prompt

    model, processor = build_tiny_qwen3_vl(attn_implementation="eager")
    inputs = processor(images=[synthetic_image(5, (224, 160))], text=[prompt(processor, "what is it?")],
                       return_tensors="pt")
    flops = FlopsModel.from_model(model)
    assert flops.injections == ((1, 98304), (3, 98304), (4, 98304)) and flops.merge_size == 4
    counted, analytic, _ = counted_and_analytic(model, inputs, *strategy)
    assert analytic == counted


@pytest.mark.parametrize("strategy", [("keep_all", {}), ("random", {"budget": 20, "stage": "vision_layer", "layer": 2}),
                                      ("random", {"budget": 20, "stage": "llm_layer", "layer": 2})])
def test_exact_count_of_llava_onevision_reads_siglip_crops(strategy):
    """LLaVA-OneVision: every crop through SigLIP (no [CLS]) and the projector, the unpadded grid and its newlines
    into Qwen2; torch's count of an eager prefill equals the analytic one."""
    from prunekit.tiny import build_tiny_onevision, synthetic_image
    from helpers import prompt

    model, processor = build_tiny_onevision(attn_implementation="eager")
    inputs = processor(images=[synthetic_image(5, (224, 160))], text=[prompt(processor, "what is it?")],
                       return_tensors="pt")
    flops = FlopsModel.from_model(model)
    assert flops.vision_prefix == 0 and flops.injections == ()
    counted, analytic, _ = counted_and_analytic(model, inputs, *strategy)
    assert analytic == counted


@pytest.mark.parametrize("family,strategy", [
    ("qwen3-vl", ("keep_all", {})), ("qwen3-vl", ("random", {"budget": 9, "stage": "vision_layer", "layer": 2})),
    ("onevision", ("keep_all", {})), ("onevision", ("random", {"budget": 6, "stage": "vision_layer", "layer": 2})),
    ("onevision", ("random", {"budget": 20, "stage": "llm_layer", "layer": 2}))],
    ids=lambda v: v if isinstance(v, str) else v[0] + "@" + v[1].get("stage", ""))
def test_exact_count_of_a_video(family, strategy):
    """A 6-frame video: Qwen3-VL's ViT attends within each temporal patch (3 of them, 48 patches each); OneVision's
    SigLIP and projector run on every frame's whole grid (64 patches), kept windows only after a cut, then the pooled
    tokens enter the LLM. torch's count of an eager prefill equals the analytic one."""
    from prunekit.tiny import build_tiny_onevision, build_tiny_qwen3_vl, synthetic_image

    build = build_tiny_qwen3_vl if family == "qwen3-vl" else build_tiny_onevision
    model, processor = build(attn_implementation="eager")
    content = [{"type": "video"}, {"type": "text", "text": "what happens?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=[text], videos=[[synthetic_image(i, (128, 96)) for i in range(6)]], return_tensors="pt")
    counted, analytic, handle = counted_and_analytic(model, inputs, *strategy)
    assert handle.trace.unit_patches == ([[48, 48, 48]] if family == "qwen3-vl" else [[64] * 6])
    assert analytic == counted
    text = int(inputs["attention_mask"].sum()) - handle.trace.n_vanilla[0]
    unpruned = trace_flops(FlopsModel.from_model(model), handle.trace, 0, text, unpruned=True)["exact"]
    assert (unpruned == analytic) if strategy[0] == "keep_all" else (unpruned > analytic)  # the vanilla model's count

"""Qwen3.5: a hybrid language model (Gated DeltaNet linear-attention layers between full-attention ones) behind
Qwen3-VL's ViT. Vision-side and projector-side strategies run; cuts inside the language model are refused with the
reason; FlowCut runs its ViT stage alone; the FLOPs count no n² term for a linear-attention layer.
(The runtime invariants on Qwen3.5: tests/test_families_invariants.py.)"""
import pytest
import torch

import prunekit
from prunekit.errors import UnsupportedModelError
from prunekit.flops import FlopsModel
from prunekit.tiny import build_tiny_qwen3_5, synthetic_image
from helpers import prompt

pytestmark = pytest.mark.contract


@pytest.fixture(scope="module")
def qwen35():
    model, processor = build_tiny_qwen3_5()
    x = processor(images=[synthetic_image(5, (224, 160))], text=[prompt(processor, "what is it?")], return_tensors="pt")
    return model, processor, x


@pytest.mark.parametrize("spec", [dict(name="fastv", budget=8, layer=2), dict(name="pdrop", budget=8),
                                  dict(name="random", budget=8, stage="llm_layer", layer=1),
                                  dict(name="flowcut", budget=8, llm_stage=True)])
def test_cuts_inside_the_hybrid_language_model_are_refused(qwen35, spec):
    with pytest.raises(UnsupportedModelError, match="hybrid .*linear_attention.* prune before it"):
        prunekit.attach(qwen35[0], spec)


def test_flowcut_runs_its_vit_stage_alone(qwen35):
    """Where the references add an LLM cut (packed ViTs), Qwen3.5 takes none: FlowCut cuts the ViT to the budget, which
    counts tokens entering the language model (n_in), exactly as on LLaVA-1.5."""
    model, _, x = qwen35
    with torch.no_grad(), prunekit.attach(model, dict(name="flowcut", budget=8)) as handle:
        model(**x)
    t = handle.trace
    assert t.budget.convention == "n_in" and t.n_in == t.n_final == [8] and t.n_vanilla == [35]
    assert all(e.site.startswith("vision_layer") for e in t.events)


def test_flops_of_linear_attention_layers_have_no_quadratic_term(qwen35):
    """Layers 0-2 are Gated DeltaNet, layer 3 full attention. A linear layer's recurrence, worked out from the tiny
    config: a depthwise convolution over 2 x 32 (q, k) + 64 (v) = 128 channels with kernel 4 (512 MACs a token), and
    the delta rule's three state products (retrieve, update, read out), 3 x 4 value heads x 16 x 16 (3,072): 3,584 MACs
    a token besides projections."""
    flops = FlopsModel.from_model(qwen35[0])
    assert flops.llm_quadratic == (False, False, False, True)
    assert flops.llm_state_macs == (3584, 3584, 3584, 0)
    assert flops.llm_attention_width == 4 * 32
    one, two = flops.prefill(10, [20] * 4), flops.prefill(10, [50] * 4)
    n1, n2 = 30, 60  # doubling the tokens: linear terms double, only layer 3's n^2 term quadruples
    linear = sum(flops.llm_layer_linear) + 3 * 3584
    assert one["exact_llm"] == n1 * linear + 2 * n1 * n1 * 128
    assert two["exact_llm"] == n2 * linear + 2 * n2 * n2 * 128

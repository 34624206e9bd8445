"""Inputs that used to crash or pass silently (mixed batches, image-less prompts, impossible budgets, knob
types) and the runtime guards that refuse a broken transformers seam instead of returning a wrong result."""
import pytest
import torch

import prunekit
from prunekit import PruningError
from prunekit.errors import BudgetError, KnobError, SeamError
from helpers import batch, greedy, prompt, QUESTIONS
from prunekit.tiny import synthetic_image

pytestmark = pytest.mark.contract

LLM_STRATEGIES = [
    ("fastv", {"budget": 16}), ("pdrop", {}), ("sparsevlm", {"budget": 32}), ("dart", {"budget": 16}),
    ("random", {"budget": 16, "stage": "llm_layer", "layer": 1}),
]


def mixed_batch(processor):
    """Row 0 with an image, row 1 text-only, left-padded together."""
    texts = [prompt(processor, QUESTIONS[0]), prompt(processor, QUESTIONS[1], image=False)]
    return processor(images=[synthetic_image(100)], text=texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("name,knobs", LLM_STRATEGIES, ids=[n for n, _ in LLM_STRATEGIES])
def test_a_batch_mixing_image_and_text_only_rows_equals_its_rows_alone(model, processor, name, knobs):
    x = mixed_batch(processor)
    image_only = processor(images=[synthetic_image(100)], text=[prompt(processor, QUESTIONS[0])], return_tensors="pt")
    text_only = processor.tokenizer([prompt(processor, QUESTIONS[1], image=False)], return_tensors="pt")
    with prunekit.attach(model, name, **knobs) as handle:
        tokens, _ = greedy(model, x, steps=3)
        n_in = handle.trace.llm_layer_counts[:, 0].tolist()
        alone0, _ = greedy(model, image_only, steps=3)
        kept0 = handle.trace.kept_positions(0)
        alone1, _ = greedy(model, text_only, steps=3)
    assert n_in[1] == 0 and n_in[0] == 64  # the text-only row has no visual tokens; the image row all 64
    assert torch.equal(tokens[0], alone0[0]) and torch.equal(tokens[1], alone1[0])
    assert kept0.numel() < 64


@pytest.mark.parametrize("name,knobs", LLM_STRATEGIES[:3], ids=[n for n, _ in LLM_STRATEGIES[:3]])
def test_an_image_less_prompt_generates_as_without_pruning(model, processor, name, knobs):
    x = batch(processor, [0], image=False)
    reference, _ = greedy(model, x, steps=4)
    with prunekit.attach(model, name, **knobs):
        tokens, _ = greedy(model, x, steps=4)
    assert torch.equal(tokens, reference)


@pytest.mark.parametrize("name", ["fastv", "pdrop", "random"])
def test_a_budget_above_the_visual_tokens_of_a_sample_is_refused(model, processor, name):
    knobs = {"stage": "llm_layer", "layer": 1} if name == "random" else {}
    with prunekit.attach(model, name, budget=1000, **knobs):
        with pytest.raises(BudgetError, match="budget 1000 exceeds the 64 visual tokens of sample 0"):
            model(**batch(processor, [0]))


@pytest.mark.parametrize("knobs,match", [
    ({"batch_coupled": "false"}, "batch_coupled='false' \\(str\\) must be a boolean"),
    ({"budget": "64"}, "budget='64' \\(str\\) must be an integer"),
    ({"budget": 64.0}, "budget=64.0 \\(float\\) must be an integer"),
    ({"history_weight": "half"}, "history_weight='half'"),
])
def test_knobs_of_the_wrong_type_are_refused(knobs, match):
    with pytest.raises(KnobError, match=match):
        prunekit.build_strategy("flowcut", **({"budget": 16} | knobs))


def test_a_knob_error_is_also_a_value_error():
    with pytest.raises(ValueError):
        prunekit.build_strategy("fastv", query=3)


def test_flowcut_without_a_budget_says_so():
    with pytest.raises(KnobError, match="flowcut.*budget=None .* must be an integer"):
        prunekit.build_strategy("flowcut", budget=None)


def test_one_error_kind_per_kind_of_mistake_at_attach(model, processor):
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunekit import PruningError, UnknownStrategyError, UnsupportedInputError, UnsupportedModelError

    cases = [
        (UnknownStrategyError, KeyError, lambda: prunekit.attach(model, "flowkut", budget=8), "Did you mean 'flowcut'"),
        (KnobError, ValueError, lambda: prunekit.attach(model, "fastv", budget=8, layer=9), "fastv"),
        (KnobError, ValueError, lambda: prunekit.attach(model, "random", budget=8, stage="llm_layer", layer=4),
         "LLM layer 4"),
        (BudgetError, ValueError, lambda: prunekit.attach(model, "random", budget=65), "exceeds the 64"),
        (UnsupportedModelError, TypeError, lambda: prunekit.attach(LlamaForCausalLM(LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1)), "random", budget=4), "no adapter for LlamaForCausalLM"),
    ]
    for kind, builtin, call, match in cases:
        with pytest.raises(kind, match=match) as err:
            call()
        assert isinstance(err.value, (PruningError, builtin)) and isinstance(err.value, builtin)
    x = batch(processor, [0])
    with prunekit.attach(model, "random", budget=8):
        with pytest.raises(UnsupportedInputError, match="labels are not supported"):
            model(**x, labels=x["input_ids"])
        with pytest.raises(UnsupportedInputError, match="beam search"):
            model.generate(**x, num_beams=2, max_new_tokens=2)

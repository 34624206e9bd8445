"""Bad input gets a clear error naming the problem and the fix; unsupported uses are refused."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import prunekit
from prunekit import PruningError
from helpers import batch, greedy

pytestmark = pytest.mark.contract  # the runtime contract: CI runs it on every transformers minor


def test_budget_above_the_visual_tokens_is_refused(model):
    with pytest.raises(ValueError, match="exceeds the 64 visual tokens per image.*<= 64"):
        prunekit.attach(model, "random", budget=65)
    prunekit.attach(model, "random", budget=64).detach()  # == N keeps all


def test_unsupported_model_names_the_supported_families():
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(TypeError, match="no adapter for LlamaForCausalLM.*llava-1.5"):
        prunekit.attach(lm, "random", budget=4)


def test_attaching_twice_is_refused(model):
    with prunekit.attach(model, "random", budget=8):
        with pytest.raises(PruningError, match="already has .* attached; detach"):
            prunekit.attach(model, "pooling", budget=16)


def test_llm_layer_out_of_range_is_refused(model):
    with pytest.raises(PruningError, match="LLM layer 4.*4 layers"):
        prunekit.attach(model, "random", budget=8, stage="llm_layer", layer=4)


def test_pooling_budget_it_cannot_reach_exactly(model, processor):
    with prunekit.attach(model, "pooling", budget=61):
        with pytest.raises(ValueError, match="exactly 61 tokens from a 8x8 grid.*56"):
            model(**batch(processor, [0]))


@pytest.mark.parametrize("spec", [dict(name="random", budget=8),
                                  dict(name="random", budget=8, stage="llm_layer", layer=1)])
def test_forward_without_images_does_nothing_and_says_so(model, processor, spec):
    x = batch(processor, [0, 1], image=False)
    logits = model(**x).logits
    tokens, _ = greedy(model, x)
    with prunekit.attach(model, spec) as h:
        assert torch.equal(model(**x).logits, logits)
        assert h.trace.n_in == [0, 0] and not h.trace.has_images(0)
        assert "no image tokens" in " ".join(h.trace.notes)
        assert torch.equal(greedy(model, x)[0], tokens)


def test_labels_are_refused(model, processor):
    x = batch(processor, [0])
    with prunekit.attach(model, "random", budget=8):
        with pytest.raises(PruningError, match="labels are not supported"):
            model(**x, labels=x["input_ids"])


def test_beam_search_and_static_cache_are_refused(model, processor):
    x = batch(processor, [0])
    with prunekit.attach(model, "random", budget=8):
        with pytest.raises(PruningError, match="beam search"):
            model.generate(**x, max_new_tokens=2, num_beams=2)
        with pytest.raises(PruningError, match="dynamic cache"):
            model.generate(**x, max_new_tokens=2, cache_implementation="static")


def test_second_turn_on_a_pruned_cache_is_refused(model, processor):
    x = batch(processor, [0])
    with prunekit.attach(model, "random", budget=8):
        out = model.generate(**x, max_new_tokens=2, return_dict_in_generate=True)
        more = torch.tensor([[5, 6, 7]])
        mask = torch.ones(1, out.sequences.shape[1] + 3, dtype=torch.long)
        with pytest.raises(PruningError, match="second turn"):
            model(input_ids=more, attention_mask=mask, past_key_values=out.past_key_values)


def test_a_cache_from_elsewhere_is_refused(model, processor):
    x = batch(processor, [0])
    cache = model(**x, use_cache=True).past_key_values  # filled before attaching
    with prunekit.attach(model, "random", budget=8):
        with pytest.raises(PruningError, match="not filled by a prefill under this attachment"):
            model(input_ids=torch.tensor([[5]]), past_key_values=cache)


def test_image_placeholders_without_pixels_cannot_be_pruned_before_the_llm(model, processor):
    x = batch(processor, [0])
    embeds = model.get_input_embeddings()(x["input_ids"])  # placeholders present, features never computed
    with prunekit.attach(model, "random", budget=8):
        with pytest.raises(PruningError, match="no image went through the vision tower"):
            model(inputs_embeds=embeds, attention_mask=x["attention_mask"])


def test_vision_layer_at_or_after_the_feature_layer_is_refused(model):
    # tiny LLaVA: 6 encoder layers, features read at hidden_states[-2] = output of layer 4
    with pytest.raises(PruningError, match="output of vision layer 4.*0..3.*vision_output"):
        prunekit.attach(model, "random", budget=8, stage="vision_layer", layer=4)
    prunekit.attach(model, "random", budget=8, stage="vision_layer", layer=3).detach()

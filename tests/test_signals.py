"""Attention rows from q and k (no eager, no N x N map) equal eager attention probabilities."""
import pytest
import torch
from transformers import AutoModelForImageTextToText

from prunekit.signals import AttentionProbe, AttentionRows
from helpers import batch


@pytest.fixture(scope="module")
def eager_model(tiny_dir):
    return AutoModelForImageTextToText.from_pretrained(tiny_dir, attn_implementation="eager").eval()


def probe_on(model, llm_layer=1, vision_layer=2):
    lm_attn = model.model.language_model.layers[llm_layer].self_attn
    vis_attn = model.model.vision_tower.encoder.layers[vision_layer].self_attn
    probe = AttentionProbe()
    probe.watch(lm_attn, AttentionRows("last", "all"), AttentionRows("last", "mean"), values=True)
    probe.watch(vis_attn, AttentionRows("first", "all"), AttentionRows("mean", "mean"))
    return probe.install(), lm_attn, vis_attn


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_rows_equal_eager_probabilities_at_batch_4_with_left_padding(model, eager_model, processor, backend):
    x = batch(processor, [0, 1, 2, 3])
    assert (x["attention_mask"] == 0).any()
    ref = eager_model(**x, output_attentions=True).attentions[1]  # (B, H, L, L) of LM layer 1
    ref_vis = eager_model.model.vision_tower(x["pixel_values"], output_attentions=True).attentions[2]
    target = model if backend == "sdpa" else eager_model
    probe, lm_attn, vis_attn = probe_on(target)
    try:
        target(**x)
    finally:
        probe.remove()
    rows = probe.rows[(lm_attn, AttentionRows("last", "all"))]
    torch.testing.assert_close(rows, ref[:, :, -1], rtol=0, atol=1e-6)
    torch.testing.assert_close(probe.rows[(lm_attn, AttentionRows("last", "mean"))], ref[:, :, -1].mean(1),
                               rtol=0, atol=1e-6)
    assert (rows[x["attention_mask"][:, None].expand_as(rows) == 0] == 0).all()  # padding gets nothing
    torch.testing.assert_close(probe.rows[(vis_attn, AttentionRows("first", "all"))], ref_vis[:, :, 0],
                               rtol=0, atol=1e-6)
    mean_rows = probe.rows[(vis_attn, AttentionRows("mean", "mean"))]
    torch.testing.assert_close(mean_rows.sum(-1), torch.ones(4))
    assert probe.values[lm_attn].shape[2] == x["input_ids"].shape[1]


def test_probing_keeps_the_backend_and_the_outputs(model, processor):
    x = batch(processor, [0, 1])
    logits = model(**x).logits
    probe, lm_attn, _ = probe_on(model)
    assert model.config.text_config._attn_implementation == "prunekit_sdpa"
    try:
        assert torch.equal(model(**x).logits, logits)
    finally:
        probe.remove()
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert torch.equal(model(**x).logits, logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rows_in_half_precision_are_finite_distributions(tiny_dir, processor, dtype):
    half = AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=dtype).eval()
    x = batch(processor, [0, 1])
    x["pixel_values"] = x["pixel_values"].to(dtype)
    probe, lm_attn, vis_attn = probe_on(half)
    try:
        half(**x)
    finally:
        probe.remove()
    for key, rows in probe.rows.items():
        assert torch.isfinite(rows).all()
        torch.testing.assert_close(rows.sum(-1), torch.ones_like(rows.sum(-1)), rtol=0, atol=1e-4)


def test_unknown_query_is_refused():
    with pytest.raises(ValueError, match="unknown query"):
        AttentionRows("cls")

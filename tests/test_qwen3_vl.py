"""Qwen3-VL: DeepStack features stay aligned with the kept tokens through every cut. Each pruned forward is compared
with the model's own pieces run by hand on the kept tokens only, adding at every injection layer the DeepStack rows of
exactly those tokens; a control checks that the comparison notices rows taken from the wrong tokens.
(The runtime invariants on Qwen3-VL: tests/test_families_invariants.py.)"""
import pytest
import torch

import prunekit
from prunekit.adapters import adapter_for
from prunekit.errors import PruningError
from prunekit.tiny import build_tiny_qwen3_vl, synthetic_image
from helpers import prompt

pytestmark = pytest.mark.contract


@pytest.fixture(scope="module")
def qwen3():
    model, processor = build_tiny_qwen3_vl()
    x = processor(images=[synthetic_image(5, (224, 160))], text=[prompt(processor, "what is it?")], return_tensors="pt")
    return model, processor, x


def language_model_call(model, x) -> dict:
    """The unpruned language model's kwargs, as the multimodal model builds them (embeddings, M-RoPE ids, DeepStack)."""
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        model(**x)
    hook.remove()
    return seen


def run_language_model(model, call, keep_slots, cut_layer, ds_rows):
    """Decoder layers by hand on one sample: all slots before ``cut_layer``, ``keep_slots`` from it on; after layer i
    the i-th DeepStack feature of row ``ds_rows(i, slots)`` is added at each visual slot still there."""
    adapter = adapter_for(model)
    lm = model.model.language_model
    hidden, positions = call["inputs_embeds"], call["position_ids"]
    if positions.shape[0] == 4:
        positions = positions[1:]
    visual, features = call["visual_pos_masks"][0], call["deepstack_visual_embeds"]
    slots = torch.arange(hidden.shape[1])
    for i, layer in enumerate(lm.layers):
        if i == cut_layer:
            slots = keep_slots
            hidden = hidden[:, keep_slots]
        rope = lm.rotary_emb(hidden, positions[:, :, slots])
        hidden = adapter.run_decoder_layer(layer, hidden, rope)
        if i < len(features):
            live = visual[slots]
            hidden = hidden.clone()
            hidden[0, live] += features[i][ds_rows(i, slots[live])]
    return model.lm_head(lm.norm(hidden))


def visual_row(call):
    """The DeepStack row of each sequence slot (its rank among the visual slots)."""
    return call["visual_pos_masks"][0].long().cumsum(0) - 1


@pytest.mark.parametrize("spec", [dict(name="fastv", budget=8, layer=2), dict(name="random", budget=8, layer=2,
                                                                                stage="llm_layer"),
                                  dict(name="random", budget=8, stage="projector_output")],
                         ids=["fastv@llm2", "random@llm2", "random@projector_output"])
def test_deepstack_rows_follow_the_kept_tokens(qwen3, spec):
    """A cut at the LLM's entry (projector_output) or before decoder layer 2 (DeepStack adds after layers 0, 1 and 2):
    the pruned logits equal the hand-run layers over the kept tokens with each kept token's own DeepStack rows."""
    model, _, x = qwen3
    call = language_model_call(model, x)
    with torch.no_grad(), prunekit.attach(model, spec) as handle:
        pruned = model(**x).logits
    visual = call["visual_pos_masks"][0]
    kept = handle.trace.samples[0].kept.sort().values
    assert 0 < len(kept) < int(visual.sum())
    keep_slots = torch.cat([(~visual).nonzero().squeeze(1), visual.nonzero().squeeze(1)[kept]]).sort().values
    cut = spec.get("layer", 0)  # the decoder layer the kept tokens enter (0: the LLM's entry)
    row, n_visual = visual_row(call), int(visual.sum())
    with torch.no_grad():
        expected = run_language_model(model, call, keep_slots, cut, lambda i, slots: row[slots])
        shifted = run_language_model(model, call, keep_slots, cut,  # after the cut: the first rows, not the kept ones'
                                     lambda i, slots: torch.arange(len(slots)) if len(slots) < n_visual else row[slots])
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-5)
    assert (pruned - shifted).abs().max() > 1e-3  # the comparison sees misaligned rows


def test_deepstack_rows_follow_a_cut_inside_the_vit(qwen3):
    """random@vision_layer2 cuts between DeepStack's blocks 1 and 3: block 1's merger sees every group, blocks 3 and 4's
    mergers and the final merger the kept groups only. The tower run by hand on the kept groups gives the same logits."""
    model, _, x = qwen3
    adapter = adapter_for(model)
    visual_tower = model.model.visual
    call = language_model_call(model, x)
    with torch.no_grad(), prunekit.attach(model, dict(name="random", budget=8, stage="vision_layer", layer=2)) as handle:
        pruned = model(**x).logits
    kept = handle.trace.samples[0].kept.sort().values  # merge groups, raster order (Qwen3-VL: no windows)
    rows = (kept[:, None] * 4 + torch.arange(4)).reshape(-1)
    grid = x["image_grid_thw"]
    with torch.no_grad():
        hidden, (cos, sin) = adapter.vision_embed_packed(x["pixel_values"], grid)
        n = hidden.shape[0]
        features = {}
        for i, block in enumerate(visual_tower.blocks):
            if i == 3:
                hidden, cos, sin = hidden[rows], cos[rows], sin[rows]
            cu = torch.tensor([0, hidden.shape[0]], dtype=torch.int32)
            hidden = adapter.run_vision_block(block, hidden, cu, (cos, sin))
            if i in visual_tower.deepstack_visual_indexes:
                j = visual_tower.deepstack_visual_indexes.index(i)
                features[j] = visual_tower.deepstack_merger_list[j](hidden)
        merged = visual_tower.merger(hidden)
    assert n == 4 * int(call["visual_pos_masks"].sum())
    visual = call["visual_pos_masks"][0]
    keep_slots = torch.cat([(~visual).nonzero().squeeze(1), visual.nonzero().squeeze(1)[kept]]).sort().values
    embeds = call["inputs_embeds"].clone()
    embeds[0, visual.nonzero().squeeze(1)[kept]] = merged
    by_hand = dict(call, inputs_embeds=embeds, deepstack_visual_embeds=[features[0]] +
                   [torch.zeros(int(visual.sum()), 128).index_copy(0, kept, features[j]) for j in (1, 2)])
    row = visual_row(call)
    with torch.no_grad():
        expected = run_language_model(model, by_hand, keep_slots, 0, lambda i, slots: row[slots])
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-5)


def test_injections_at_other_positions_than_the_image_tokens_are_refused(qwen3):
    model, _, x = qwen3

    def shift(module, args, kwargs):
        kwargs["visual_pos_masks"] = kwargs["visual_pos_masks"].roll(1, dims=1)
        return args, kwargs

    hook = model.model.language_model.register_forward_pre_hook(shift, with_kwargs=True, prepend=True)
    try:
        with torch.no_grad(), prunekit.attach(model, dict(name="fastv", budget=8, layer=2)):
            with pytest.raises(PruningError, match="DeepStack"):
                model(**x)
    finally:
        hook.remove()


def test_a_merged_token_adds_the_mean_of_its_members_deepstack_rows(qwen3):
    """pooling@projector_output averages windows of merged tokens (5x7 -> 2x2: windows of 6 to 12 tokens) into one:
    its DeepStack addition is the mean of those tokens' rows (the same pooling), worked out here from the unpruned
    model's DeepStack features."""
    model, _, x = qwen3
    vanilla = language_model_call(model, x)
    seen = {}
    with torch.no_grad(), prunekit.attach(model, dict(name="pooling", budget=4, stage="projector_output")) as handle:
        hook = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
        try:
            pruned = model(**x).logits
        finally:
            hook.remove()
    track = handle.trace.samples[0]
    assert len(track.kept) == 4 and all(len(m) >= 6 for m in track.members)
    # the kept sequence: text slots as they were, one slot per pooled token where its representative sat
    full_visual = vanilla["visual_pos_masks"][0]
    keep_slots = torch.cat([(~full_visual).nonzero().squeeze(1), full_visual.nonzero().squeeze(1)[track.kept]]).sort().values
    visual = full_visual[keep_slots]
    features = [torch.stack([f[m].mean(0) for m in track.members]) for f in vanilla["deepstack_visual_embeds"]]
    by_hand = dict(inputs_embeds=seen["inputs_embeds"], position_ids=seen["position_ids"],
                   visual_pos_masks=visual[None], deepstack_visual_embeds=features)
    rank = visual.long().cumsum(0) - 1
    with torch.no_grad():
        expected = run_language_model(model, by_hand, None, -1, lambda i, slots: rank[slots])
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", [dict(name="fastv", budget=8, layer=2),
                                  dict(name="random", budget=6, stage="vision_layer", layer=2)], ids=["fastv@llm2",
                                                                                                   "random@vision_layer2"])
def test_several_images_per_sample_keep_their_rows_in_a_padded_batch(qwen3, spec):
    """Sample 0 has two images, sample 1 one (left padding): DeepStack rows run over the batch's image tokens in
    row-major order, so each sample's rows start at its own offset; each sample's logits equal those it has alone."""
    model, processor, _ = qwen3
    processor.tokenizer.padding_side = "left"
    samples = [[(224, 160), (128, 128)], [(160, 224)]]

    def inputs(which):
        texts, images = [], []
        for i in which:
            content = [{"type": "image"} for _ in samples[i]] + [{"type": "text", "text": "what is it?"}]
            texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
            images += [synthetic_image(10 * i + j, size) for j, size in enumerate(samples[i])]
        return processor(images=images, text=texts, return_tensors="pt", padding=True)

    with torch.no_grad(), prunekit.attach(model, spec) as handle:
        together = model(**inputs([0, 1])).logits[:, -1]
        assert handle.trace.n_vanilla == [35 + 16, 35]
        for b in (0, 1):
            alone = model(**inputs([b])).logits[:, -1]
            torch.testing.assert_close(alone, together[b : b + 1], rtol=1e-5, atol=1e-5)

"""Video: a video's frames are vision units (docs/support.md, "Video"). On the Qwen families each temporal patch is a
packed-ViT unit whose 2x2 merge groups stay whole and a vision-side budget is per video, split over its frames; on
Qwen3-VL the DeepStack rows follow the kept video tokens; on LLaVA-OneVision the frames' grids are pooled 2x2 before
the language model, so its videos take llm_layer cuts and a vision-side cut is refused with the reason. The offline
processors' video placeholders and temporal patches are checked against values worked out by hand."""
import pytest
import torch

import prunekit
from prunekit.adapters import adapter_for
from prunekit.errors import PruningError, UnsupportedInputError
from prunekit.pruner import Budget, PruneContext, Site, Stage
from prunekit.tiny import (build_tiny_internvl, build_tiny_onevision, build_tiny_qwen2_5_vl, build_tiny_qwen2_vl,
                           build_tiny_qwen3_5, build_tiny_qwen3_vl, synthetic_image)
from helpers import prompt
from test_qwen3_vl import language_model_call, run_language_model, visual_row

pytestmark = pytest.mark.contract

BUILDERS = {"qwen2-vl": build_tiny_qwen2_vl, "qwen2.5-vl": build_tiny_qwen2_5_vl, "qwen3-vl": build_tiny_qwen3_vl,
            "qwen3.5": build_tiny_qwen3_5, "onevision": build_tiny_onevision}


@pytest.fixture(scope="module")
def built():
    out = {}
    for name, build in BUILDERS.items():
        model, processor = build()
        processor.tokenizer.padding_side = "left"
        out[name] = (model, processor)
    return out


def video_prompt(processor, question="what happens?"):
    return processor.apply_chat_template([{"role": "user", "content": [{"type": "video"},
                                                                      {"type": "text", "text": question}]}],
                                         add_generation_prompt=True)


def frames(n, seed=0, size=(128, 96)):
    return [synthetic_image(seed + i, size) for i in range(n)]


def videos(processor, counts, seeds=None, questions=None):
    seeds = seeds or [10 * i for i in range(len(counts))]
    questions = questions or ["what happens?", "is it red?", "how many?"]
    return processor(text=[video_prompt(processor, questions[i % 3]) for i in range(len(counts))],
                     videos=[frames(n, s) for n, s in zip(counts, seeds)], return_tensors="pt", padding=True)


# --- the offline processors ----------------------------------------------------------------------------------------
def test_qwen3_vl_places_a_timestamp_before_each_temporal_patch(built):
    """4 frames sampled at source frames 0, 4, 8, 12 of a 2 fps video: temporal patches (0, 4) and (8, 12), at the
    mean of their frames' times: 1.0 s and 5.0 s. A 128x96 frame is 8x6 patches of 16 px: 4x3 = 12 merged tokens."""
    _, processor = built["qwen3-vl"]
    x = processor(text=[video_prompt(processor)], videos=[frames(4)], return_tensors="pt",
                  video_metadata=[{"fps": 2.0, "frames_indices": [0, 4, 8, 12], "total_num_frames": 16}])
    text = processor.tokenizer.decode(x["input_ids"][0])
    frame = "<|vision_start|>" + "<|video_pad|>" * 12 + "<|vision_end|>"
    assert "<1.0 seconds>" + frame + "<5.0 seconds>" + frame + "what happens?" in text
    assert x["video_grid_thw"].tolist() == [[2, 6, 8]]
    assert x["pixel_values_videos"].shape == (2 * 48, 3 * 2 * 16 * 16)
    assert (x["mm_token_type_ids"][0] == 2).sum() == 24 == (x["input_ids"][0] == processor.video_token_id).sum()


def test_a_temporal_patch_holds_its_two_frames_in_order(built):
    """Slot t of a video patch is frame t of its pair: the image processor's patch of one frame repeats that frame in
    both slots, so slot 0 of the video equals frame 0's patch and slot 1 frame 1's; an odd count repeats the last."""
    _, processor = built["qwen3-vl"]
    clip = frames(3)
    x = processor(text=[video_prompt(processor)], videos=[clip], return_tensors="pt")
    video = x["pixel_values_videos"].view(2, 48, 3, 2, 256)
    single = [processor.image_processor(images=[f], return_tensors="pt")["pixel_values"].view(48, 3, 2, 256)
              for f in clip]
    assert torch.equal(video[0, :, :, 0], single[0][:, :, 0]) and torch.equal(video[0, :, :, 1], single[1][:, :, 1])
    assert torch.equal(video[1, :, :, 0], single[2][:, :, 0]) and torch.equal(video[1, :, :, 1], single[2][:, :, 1])
    assert not torch.equal(video[0, :, :, 0], video[0, :, :, 1])


def test_onevision_writes_frames_times_the_pooled_grid_plus_one_newline(built):
    """112 px frames of 14 px patches: an 8x8 grid, pooled to 4x4 = 16 tokens a frame; 3 frames + 1 newline = 49."""
    _, processor = built["onevision"]
    x = processor(text=[video_prompt(processor)], videos=[frames(3)], return_tensors="pt")
    assert (x["input_ids"][0] == processor.video_token_id).sum() == 3 * 16 + 1
    assert x["pixel_values_videos"].shape == (1, 3, 3, 112, 112)


# --- the runtime on videos ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(BUILDERS))
def test_keep_all_on_a_video_is_vanilla(built, family):
    model, processor = built[family]
    x = videos(processor, [4, 4] if family == "onevision" else [4, 6])
    with torch.no_grad():
        logits = model(**x).logits
        with prunekit.attach(model, "keep_all") as h:
            assert torch.equal(model(**x).logits, logits)
    assert h.trace.n_final == h.trace.n_vanilla
    assert h.trace.n_vanilla == (x["input_ids"] == processor.video_token_id).sum(1).tolist()


def test_a_vision_side_budget_is_per_video_split_over_its_frames(built):
    """Budget 16 over a 6-frame video (3 temporal patches of 12 tokens): 16 // 3 = 5 a frame, 15 in all; over a 4-frame
    one (2 patches): 8 a frame, 16."""
    model, processor = built["qwen3-vl"]
    with torch.no_grad(), prunekit.attach(model, "random", budget=16, stage="vision_layer", layer=1) as h:
        model(**videos(processor, [6, 4]))
    (event,) = h.trace.events
    assert event.n_in == [36, 24] and event.n_out == [15, 16]
    assert h.trace.vision_units == [3, 2] and h.trace.unit_tokens == [[12, 12, 12], [12, 12]]


def test_budget_targets_divide_by_the_frames_of_each_unit():
    ctx = PruneContext(site=Site(Stage.VISION_LAYER, 1), tokens=torch.zeros(3, 12, 4), lengths=torch.tensor([12, 12, 3]),
                       grids=[None] * 3, sample_of=[0, 0, 1], budget=Budget(16, "n_in"), video_frames=[3, 3, 1])
    assert [ctx.target(u) for u in range(3)] == [5, 5, 3]  # 16 // 3 = 5; the image keeps its 3 (<= 16)
    llm = PruneContext(site=Site(Stage.LLM_LAYER, 2), tokens=torch.zeros(1, 36, 4), lengths=torch.tensor([36]),
                       grids=[None], sample_of=[0], budget=Budget(16, "n_in"), video_frames=None)
    assert llm.target(0) == 16  # in the language model the budget is the video's


@pytest.mark.parametrize("spec", [dict(name="fastv", budget=8, layer=2),
                                  dict(name="random", budget=10, stage="projector_output")], ids=["fastv", "random"])
def test_deepstack_rows_follow_the_kept_video_tokens(built, spec):
    """Qwen3-VL adds DeepStack rows at video tokens too: the pruned logits equal the hand-run layers over the kept
    tokens, each with its own rows."""
    model, processor = built["qwen3-vl"]
    x = videos(processor, [4])
    call = language_model_call(model, x)
    with torch.no_grad(), prunekit.attach(model, spec) as handle:
        pruned = model(**x).logits
    visual = call["visual_pos_masks"][0]
    assert torch.equal(visual, x["input_ids"][0] == processor.video_token_id)
    kept = handle.trace.samples[0].kept.sort().values
    assert 0 < len(kept) < int(visual.sum())
    keep_slots = torch.cat([(~visual).nonzero().squeeze(1), visual.nonzero().squeeze(1)[kept]]).sort().values
    row = visual_row(call)
    with torch.no_grad():
        expected = run_language_model(model, call, keep_slots, spec.get("layer", 0), lambda i, slots: row[slots])
        shifted = run_language_model(model, call, keep_slots, spec.get("layer", 0),
                                     lambda i, slots: (row[slots] + 1) % int(visual.sum()))
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-5)
    assert (pruned - shifted).abs().max() > 1e-3  # the comparison notices other tokens' rows


@pytest.mark.parametrize("family,spec", [("qwen3-vl", dict(name="flowcut", budget=8)),
                                         ("qwen2.5-vl", dict(name="random", budget=12, stage="vision_layer", layer=1)),
                                         ("onevision", dict(name="fastv", budget=20, layer=2))],
                         ids=["qwen3-vl-flowcut", "qwen2.5-vl-random@vision1", "onevision-fastv"])
def test_a_padded_batch_of_videos_equals_each_alone_and_cache_equals_recompute(built, family, spec):
    model, processor = built[family]
    counts = [4, 4] if family == "onevision" else [6, 2]
    x = videos(processor, counts)
    assert (x["attention_mask"] == 0).any()
    with torch.no_grad(), prunekit.attach(model, spec) as h:
        last = model(**x).logits[:, -1]
        n_final = h.trace.n_final
        assert all(0 < n < v for n, v in zip(n_final, h.trace.n_vanilla))
        for b in range(2):
            one = videos(processor, counts[b : b + 1], seeds=[10 * b], questions=[["what happens?", "is it red?"][b]])
            torch.testing.assert_close(model(**one).logits[:, -1], last[b : b + 1], rtol=1e-5, atol=1e-5)
            assert h.trace.n_final == [n_final[b]]
        out = model.generate(**x, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        tokens, logits = out.sequences[:, x["input_ids"].shape[1]:], torch.stack(out.logits, 1)
        with h.replay():
            for t in range(3):
                torch.testing.assert_close(recompute(model, x, tokens[:, :t]), logits[:, t], rtol=1e-5, atol=1e-5)


def recompute(model, x, generated):
    """The prompt plus the tokens generated so far in one forward, no cache."""
    ids = torch.cat([x["input_ids"], generated], 1)
    extra = {k: x[k] for k in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts") if k in x}
    if "mm_token_type_ids" in x:
        extra["mm_token_type_ids"] = torch.cat([x["mm_token_type_ids"], torch.zeros_like(generated)], 1)
    else:
        mask = torch.cat([x["attention_mask"], torch.ones_like(generated)], 1)
        extra["position_ids"] = (mask.long().cumsum(1) - 1).clamp(min=0)
    mask = torch.cat([x["attention_mask"], torch.ones_like(generated)], 1)
    return model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits[:, -1]


# OneVision pools a frame's grid 2x2 (bilinear) after the projector. The windows of each pooled row (column), worked
# out from interpolate's sampling points (j + 0.5) * side / pooled - 0.5: an 8-patch side gives 0.5, 2.5, 4.5, 6.5
# (disjoint pairs); a 7-patch side gives 0.375, 2.125, 3.875, 5.625, so the middle windows share row 3.
WINDOWS = {112: [[0, 1], [2, 3], [4, 5], [6, 7]], 98: [[0, 1], [2, 3], [3, 4], [5, 6]]}


@pytest.fixture(scope="module")
def onevision_98():
    model, processor = build_tiny_onevision(crop_size=98)
    return model, processor


def members(crop: int, token: int) -> list[int]:
    side, rows = crop // 14, WINDOWS[crop]
    i, j = divmod(token, len(rows))
    return sorted(r * side + c for r in rows[i] for c in rows[j])


@pytest.mark.parametrize("crop", [112, 98])
def test_onevision_pooled_positions_group_the_patches_they_blend(built, onevision_98, crop):
    model, _ = built["onevision"] if crop == 112 else onevision_98
    with prunekit.attach(model, "keep_all") as handle:
        groups, frames = handle.adapter.pooled_video({"video_frames": [3, 3]}, (crop // 14) ** 2)
        layout = handle.adapter._video_layout(3, 16)
    assert [sorted(g.tolist()) for g in groups] == [members(crop, k) for k in range(16)]
    assert frames == [3] * 6
    assert layout.source.tolist() == list(range(48)) + [-1] and layout.grid is None and not layout.blended


class Diagonal(prunekit.TokenPruner):
    """Keeps pooled positions (1, 1) and (2, 2) of every frame after vision layer 1: on a 7-patch side their windows
    share patch (3, 3)."""

    name = "diagonal"

    def sites(self):
        return [prunekit.Site("vision_layer", 1)]

    def prune(self, ctx):
        return prunekit.Keep([torch.tensor([5, 10]) for _ in range(ctx.num_units)])


@pytest.mark.parametrize("crop,spec", [(112, dict(name="random", budget=6, stage="vision_layer", layer=1)),
                                       (98, dict(name="random", budget=6, stage="vision_layer", layer=1)),
                                       (98, Diagonal())], ids=["112-random", "98-random", "98-shared-patch"])
def test_onevision_vision_cut_keeps_whole_pooling_windows(built, onevision_98, crop, spec):
    """A vision_layer1 cut keeping 2 pooled positions a frame (random: budget 6 over 3 frames). The video tokens the
    language model gets equal SigLIP run by hand: layers 0-1 on every patch, the later layers on the kept windows'
    patches only (a patch two kept windows share: once), the full grid restored with zeros, the projector, the model's
    pooling, the kept positions."""
    model, processor = built["onevision"] if crop == 112 else onevision_98
    x = videos(processor, [3])
    seen = {}
    with torch.no_grad(), prunekit.attach(model, spec) as handle:
        hook = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
        model(**x)  # the hook after prunekit's: it sees the pruned embeddings
        hook.remove()
    track = handle.trace.samples[0]
    kept = track.kept[track.kept < 48].sort().values  # span positions: frame * 16 + pooled token; 48 is the newline
    per_frame = [kept[kept // 16 == f] % 16 for f in range(3)]
    assert [len(k) for k in per_frame] == [2, 2, 2] and handle.trace.n_final == [7]  # + the newline
    adapter, layers = handle.adapter, handle.adapter.vision_layers
    frames = x["pixel_values_videos"][0]
    with torch.no_grad():
        hidden = adapter.vision_embed(frames)
        for layer in layers[:2]:
            hidden = adapter.run_vision_layer(layer, hidden)
        full = torch.zeros_like(hidden)
        for f, tokens in enumerate(per_frame):
            patches = sorted({p for t in tokens.tolist() for p in members(crop, t)})
            rows = hidden[f : f + 1, patches]
            for layer in layers[2:]:
                rows = adapter.run_vision_layer(layer, rows)
            full[f, patches] = rows[0]
        pooled = model.model.apply_pooling(model.model.multi_modal_projector(full))
    expected = torch.cat([pooled[f, tokens] for f, tokens in enumerate(per_frame)])
    slots = (x["input_ids"][0] == processor.video_token_id).nonzero().squeeze(1)
    remaining = x["input_ids"][0] != processor.video_token_id
    remaining[slots[track.kept]] = True
    order = remaining.nonzero().squeeze(1)  # the language model's rows: the slots that remain, in order
    got = seen["inputs_embeds"][0][torch.isin(order, slots[kept])]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class DiagonalThenRead(Diagonal):
    """Diagonal's cut, then the signals at the projector's input: the mean query's attention and the values."""

    def sites(self):
        return [prunekit.Site("vision_layer", 1), prunekit.Site("vision_output")]

    def signals(self, site):
        if site.stage is Stage.VISION_OUTPUT:
            return prunekit.Signals(rows=(prunekit.AttentionRows("all", "mean"),), values=True)
        return None

    def prune(self, ctx):
        if ctx.stage is Stage.VISION_OUTPUT:
            self.seen = dict(attention=ctx.attention("all", "mean").clone(), values=ctx.values().clone(),
                             lengths=ctx.lengths.clone())
            return None
        return super().prune(ctx)


def test_onevision_video_signals_sum_a_positions_patches_in_the_rows_the_layer_ran_on(onevision_98):
    """After the diagonal cut each 7-patch frame runs on the union of the windows of positions 5 and 10: patches 16, 17,
    23, 24 and 24, 25, 31, 32, so rows [16, 17, 23, 24, 25, 31, 32] (patch 24 once). At the projector's input a position
    receives the sum over its patches' rows of the feature layer's attention (every query's row, averaged; head mean)
    and the mean of their values, computed here by hand from that layer's own q, k, v on those rows."""
    model, processor = onevision_98
    layer = adapter_for(model).vision_layers[-1]
    captured = {}
    hook = layer.self_attn.register_forward_pre_hook(lambda m, a, kw: captured.update(hidden=kw.get("hidden_states", a[0] if a else None)),
                                                     with_kwargs=True)
    strategy = DiagonalThenRead()
    try:
        with torch.no_grad(), prunekit.attach(model, strategy):
            model(**videos(processor, [3]))
    finally:
        hook.remove()
    h, attn = captured["hidden"], layer.self_attn
    assert h.shape[:2] == (3, 7)
    split = lambda t: t.view(*h.shape[:2], attn.num_heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = (split(p(h)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1).mean(2).mean(1)  # (frames, 7): every query, heads
    for token, rows in enumerate([[0, 1, 2, 3], [3, 4, 5, 6]]):  # positions 5 and 10 in the rows
        torch.testing.assert_close(strategy.seen["attention"][:, token], probs[:, rows].sum(-1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(strategy.seen["values"][:, :, token], v[:, :, rows].mean(2), rtol=1e-5, atol=1e-6)


def test_onevision_merges_after_the_tower_are_refused_on_a_video(built):
    model, processor = built["onevision"]
    with pytest.raises(PruningError, match="merged or reordered tokens at projector_output"):
        with torch.no_grad(), prunekit.attach(model, "pooling", budget=6, stage="projector_output"):
            model(**videos(processor, [3]))


def test_images_and_a_video_in_one_call_are_refused(built):
    model, processor = built["qwen3-vl"]
    x = videos(processor, [2])
    image = processor(images=[synthetic_image(1, (64, 64))], text=[prompt(processor, "what?")], return_tensors="pt")
    with prunekit.attach(model, "keep_all"), pytest.raises(UnsupportedInputError, match="images and a video"):
        model(**x, pixel_values=image["pixel_values"], image_grid_thw=image["image_grid_thw"])


def test_a_family_without_video_support_refuses_a_video():
    model, processor = build_tiny_internvl()
    x = processor(images=[synthetic_image(1, (112, 112))], text=[prompt(processor, "what?")], return_tensors="pt")
    with prunekit.attach(model, "keep_all"), pytest.raises(UnsupportedInputError, match="not videos"):
        model(**x, pixel_values_videos=x["pixel_values"][None])


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl", "onevision"])
def test_the_instruction_of_a_video_prompt_leaves_the_video_out(built, family):
    """MMTok / CDPruner read the instruction off the prompt: Qwen3-VL's timestamps and per-frame wrappers, Qwen2-VL's
    one run and OneVision's <video> run are not part of it."""
    from prunekit.processors import InstructionReader

    _, processor = built[family]
    x = videos(processor, [4], questions=["is the ball red?"])
    assert InstructionReader(processor).text(x["input_ids"][0].tolist(), 0) == "is the ball red?"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", ["qwen3-vl", "onevision"])
def test_a_video_prunes_in_half_precision(family, dtype):
    """The twin in bf16 / fp16 on two padded videos: a cut in the ViT, FlowCut and an LLM cut give finite logits of that
    dtype, a vision-side budget per video (8 over 2 units: 4 each) and generate runs on the pruned cache."""
    model, processor = BUILDERS[family]()
    model = model.to(dtype)
    processor.tokenizer.padding_side = "left"
    x = videos(processor, [4, 4])
    x["pixel_values_videos"] = x["pixel_values_videos"].to(dtype)
    units = 2 if family == "qwen3-vl" else 4  # temporal patches of 2 frames; OneVision: frames
    for spec in [dict(name="keep_all"), dict(name="random", budget=8, stage="vision_layer", layer=1),
                 dict(name="flowcut", budget=8), dict(name="fastv", budget=8, layer=2)]:
        with torch.no_grad(), prunekit.attach(model, spec) as h:
            logits = model(**x).logits
            assert logits.dtype == dtype and torch.isfinite(logits).all(), spec
            if spec["name"] == "random":
                (event,) = h.trace.events
                assert event.n_out == [units * (8 // units)] * 2
            elif spec["name"] != "keep_all":  # FlowCut: 2 x 8 over the frames in the tower, then 8 after LLM layer 1
                assert h.trace.n_final == [8, 8], spec
            out = model.generate(**x, max_new_tokens=2, min_new_tokens=2, do_sample=False)
            assert out.shape[1] == x["input_ids"].shape[1] + 2

"""The runtime invariants (docs/architecture.md) on the other model families: LLaVA-NeXT (anyres crops, unpadding, newlines) and
Qwen2-VL / Qwen2.5-VL / Qwen3-VL (packed ViT, 2x2 merge groups, window attention, 3-D M-RoPE, DeepStack) and InternVL
(tiles, the pixel shuffle), for every strategy that
supports the family, at batch 1 and batch 4 with left padding and images of different sizes, with and without
the KV cache. (LLaVA-1.5: tests/test_invariants.py.)"""
import pytest
import torch

import prunekit
from prunekit.tiny import (build_tiny_internvl, build_tiny_llava_next, build_tiny_qwen2_5_vl, build_tiny_qwen2_vl,
                           build_tiny_onevision, build_tiny_qwen3_5, build_tiny_qwen3_vl, synthetic_image, tiny_clip_text_dir)
from helpers import QUESTIONS, generate_positions, prompt

pytestmark = pytest.mark.contract  # the runtime contract: CI runs it on every transformers minor

FAMILIES = {
    "llava-next": (build_tiny_llava_next, [(224, 112), (112, 112), (200, 150), (112, 224)], 40),
    "qwen2-vl": (build_tiny_qwen2_vl, [(224, 224), (224, 112), (200, 150), (112, 224)], 12),
    "qwen2.5-vl": (build_tiny_qwen2_5_vl, [(224, 224), (224, 112), (200, 150), (112, 224)], 12),
    "internvl": (build_tiny_internvl, [(224, 224), (224, 112), (112, 112), (112, 224)], 12),
    "qwen3-vl": (build_tiny_qwen3_vl, [(224, 224), (224, 112), (200, 150), (112, 224)], 12),
    "llava-onevision": (build_tiny_onevision, [(224, 112), (112, 112), (200, 150), (112, 224)], 40),
    "qwen3.5": (build_tiny_qwen3_5, [(224, 224), (224, 112), (200, 150), (112, 224)], 12),
}
LLM_ONLY = ("fastv", "pdrop", "sparsevlm", "dart")  # strategies that cut inside the language model


def specs(family: str, budget: int) -> dict:
    common = {
        "keep_all@vision_layer1": dict(name="keep_all", stage="vision_layer", layer=1),
        "keep_all@vision_output": dict(name="keep_all"),
        "keep_all@projector_output": dict(name="keep_all", stage="projector_output"),
        "keep_all@llm2": dict(name="keep_all", stage="llm_layer", layer=2),
        "random@vision_layer1": dict(name="random", budget=budget, stage="vision_layer", layer=1),
        "random@vision_output": dict(name="random", budget=budget),
        "random@projector_output": dict(name="random", budget=budget, stage="projector_output"),
        "random@llm2-compact": dict(name="random", budget=budget, stage="llm_layer", layer=2, positions="compact"),
        "flowcut": dict(name="flowcut", budget=budget),
        "fastv@llm2": dict(name="fastv", budget=budget, layer=2),
        "fastv-all@llm1": dict(name="fastv", budget=budget, layer=1, query="all"),
        "fastv-mask@llm2": dict(name="fastv", budget=budget, layer=2, variant="mask"),
        "pdrop@llm1+2+3": dict(name="pdrop", budget=budget, convention="n_final", layer_list=[1, 2, 3]),
        "sparsevlm-v1.5": dict(name="sparsevlm", budget=budget),
        "sparsevlm-v2": dict(name="sparsevlm", version="v2", budget=budget),
        "sparsevlm-v1": dict(name="sparsevlm", version="v1", scale=1.5, budget=budget),  # v1: the budget is nominal
        "dart@llm2": dict(name="dart", budget=budget, layer=2),
        "divprune": dict(name="divprune", budget=budget),
        "pooling@projector_output": dict(name="pooling", budget=4, stage="projector_output"),
        "vispruner": dict(name="vispruner", budget=budget),
        "mmtok": dict(name="mmtok", budget=budget),
    }
    if family == "llava-next":
        common.update({
            "pooling@vision_layer1": dict(name="pooling", budget=20, stage="vision_layer", layer=1),
            "pooling@vision_output": dict(name="pooling", budget=20),
            "fastervlm": dict(name="fastervlm", budget=budget),
            "visionzip": dict(name="visionzip", budget=budget),
            "cdpruner": dict(name="cdpruner", budget=budget, text_encoder=str(tiny_clip_text_dir())),
        })
    if family == "llava-onevision":  # SigLIP without [CLS]: the CLS-based strategies are refused
        common.update({
            "pooling@vision_layer1": dict(name="pooling", budget=20, stage="vision_layer", layer=1),
            "pooling@vision_output": dict(name="pooling", budget=20),
        })
    if family == "qwen3.5":  # a hybrid LM takes no cut: the vision-side and projector-side cases only
        common = {k: s for k, s in common.items() if s.get("stage") != "llm_layer" and s["name"] not in LLM_ONLY}
    if family == "internvl":  # in the ViT whole 2x2 patch groups (the pixel shuffle's), put back before it
        common.update({
            "pooling@vision_output": dict(name="pooling", budget=4),  # 2x2 pooling of every tile's 4x4 tokens
            "fastervlm": dict(name="fastervlm", budget=budget),
        })
    return common


CASES = [(f, k) for f in FAMILIES for k in specs(f, FAMILIES[f][2])]
KEEP_ALL = [(f, k) for f, k in CASES if k.startswith("keep_all")]
PRUNING = [(f, k) for f, k in CASES if not k.startswith("keep_all")]
# the cross-product with generate is `heavy` (CI: newest and oldest minors); these stay in every minor's contract run
REPRESENTATIVE = {"random@vision_layer1", "flowcut", "fastv@llm2", "sparsevlm-v1.5"}
CROSS = [pytest.param(f, k, id=f"{f}-{k}", marks=() if k in REPRESENTATIVE else pytest.mark.heavy) for f, k in PRUNING]


@pytest.fixture(scope="module")
def families():
    built = {}
    for name, (build, sizes, budget) in FAMILIES.items():
        model, processor = build()
        processor.tokenizer.padding_side = "left"
        built[name] = (model, processor, sizes, budget)
    return built


def batch(processor, sizes, indices):
    texts = [prompt(processor, QUESTIONS[i % len(QUESTIONS)]) for i in indices]
    images = [synthetic_image(100 + i, sizes[i % len(sizes)]) for i in indices]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def forward_kwargs(family, x):
    """Inputs as generate's prefill sees them (LLaVA-NeXT: positions from the mask; Qwen: M-RoPE from the ids)."""
    return dict(x) if family.startswith("qwen") else {**x, "position_ids": generate_positions(x["attention_mask"])}


def greedy(model, x, steps=3):
    out = model.generate(**x, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, x["input_ids"].shape[1]:], torch.stack(out.logits, 1)


def recompute_last_logits(family, model, x, generated):
    """No cache: the prompt plus the tokens generated so far in one forward."""
    ids = torch.cat([x["input_ids"], generated], 1)
    mask = torch.cat([x["attention_mask"], torch.ones_like(generated)], 1)
    extra = {k: x[k] for k in ("pixel_values", "image_sizes", "image_grid_thw") if k in x}
    if "mm_token_type_ids" in x:
        extra["mm_token_type_ids"] = torch.cat([x["mm_token_type_ids"], torch.zeros_like(generated)], 1)
    else:
        extra["position_ids"] = generate_positions(mask)
    return model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits[:, -1]


def setup(families, family, key):
    model, processor, sizes, budget = families[family]
    return model, processor, sizes, specs(family, budget)[key]


# 1. Detached == never attached ----------------------------------------------------------------------
@pytest.mark.parametrize("family,key", PRUNING, ids=[f"{f}-{k}" for f, k in PRUNING])
def test_detach_restores_the_model(families, family, key):
    model, processor, sizes, spec = setup(families, family, key)
    x = batch(processor, sizes, [0, 1])
    with torch.no_grad():
        logits = model(**x).logits
        with prunekit.attach(model, spec, processor=processor):
            model(**x)
        assert torch.equal(model(**x).logits, logits)


# 2. Keep-all == vanilla, at every stage ---------------------------------------------------------------
@pytest.mark.parametrize("family,key", KEEP_ALL, ids=[f"{f}-{k}" for f, k in KEEP_ALL])
def test_keep_all_is_vanilla(families, family, key):
    model, processor, sizes, spec = setup(families, family, key)
    x = batch(processor, sizes, [0, 1, 2])
    with torch.no_grad():
        logits = model(**x).logits
        tokens, step_logits = greedy(model, x)
        with prunekit.attach(model, spec, processor=processor) as h:
            assert torch.equal(model(**x).logits, logits)
            assert h.trace.n_final == h.trace.n_vanilla
            t2, l2 = greedy(model, x)
    assert torch.equal(t2, tokens) and torch.equal(l2, step_logits)


# 4. Cache == recompute, with the prefill's decisions replayed ------------------------------------------
@pytest.mark.parametrize("family,key", CROSS)
def test_cache_equals_recompute(families, family, key):
    model, processor, sizes, spec = setup(families, family, key)
    x = batch(processor, sizes, [0, 1])
    with torch.no_grad(), prunekit.attach(model, spec, processor=processor) as h:
        tokens, step_logits = greedy(model, x)
        with h.replay():
            for t in range(tokens.shape[1]):
                out = recompute_last_logits(family, model, x, tokens[:, :t])
                torch.testing.assert_close(out, step_logits[:, t], rtol=1e-5, atol=1e-5)
                out[:, model.generation_config.eos_token_id] = -torch.inf  # greedy's min_new_tokens suppresses EOS
                assert torch.equal(out.argmax(-1), tokens[:, t])


# 5. Batch of four with padding == batch of one; 7. the trace counts what the LLM gets -------------------
@pytest.mark.parametrize("family,key", CROSS)
def test_batch_of_four_equals_batch_of_one(families, family, key):
    model, processor, sizes, spec = setup(families, family, key)
    x4 = batch(processor, sizes, [0, 1, 2, 3])
    assert (x4["attention_mask"] == 0).any()
    with torch.no_grad(), prunekit.attach(model, spec, processor=processor) as h:
        logits4 = model(**forward_kwargs(family, x4)).logits[:, -1]
        kept4 = [h.trace.kept_positions(b) for b in range(4)]
        members4 = [h.trace.members(b) for b in range(4)]
        tokens4, _ = greedy(model, x4)
        for b in range(4):
            x1 = batch(processor, sizes, [b])
            out = model(**forward_kwargs(family, x1)).logits
            torch.testing.assert_close(out[:, -1], logits4[b : b + 1], rtol=1e-5, atol=1e-5)
            t = h.trace
            assert torch.equal(t.kept_positions(0), kept4[b])
            assert all(torch.equal(m1, m4) for m1, m4 in zip(t.members(0), members4[b]))
            assert torch.equal(greedy(model, x1)[0], tokens4[b : b + 1])
            # honest accounting: the sequence shrank by exactly the dropped visual tokens
            removed = 0 if spec.get("variant") == "mask" else t.n_vanilla[0] - t.n_final[0]
            assert out.shape[1] == x1["input_ids"].shape[1] - removed
            kept = t.kept_positions(0)
            assert kept.unique().numel() == len(kept) == t.n_final[0]
            assert int(kept.max()) < t.n_vanilla[0]


def test_flowcut_two_stages_end_at_exactly_the_budget(families):
    for family in [f for f in FAMILIES if f != "qwen3.5"]:  # Qwen3.5's LM takes no cut: tests/test_qwen3_5.py
        model, processor, sizes, budget = families[family]
        with torch.no_grad(), prunekit.attach(model, "flowcut", budget=budget) as h:
            model(**batch(processor, sizes, [0, 1, 2, 3]))
        t = h.trace
        assert [ev.site for ev in t.events][-1] == "llm_layer[2]", family
        assert t.budget.convention == "n_final"
        assert t.n_final == [min(budget, n) for n in t.n_in], family
        per_unit = max(budget // 2, 1) if family in ("llava-next", "internvl") else 2 * budget  # int(T/2) / unit, 2T
        assert all(n <= per_unit * 5 for n in t.n_in)


def test_qwen_kept_tokens_keep_their_mrope_positions(families):
    """Invariant 3 on Qwen2-VL: pruning after the merger == the unpatched language model fed the kept merged
    tokens at their original 3-D positions (get_rope_index of the full prompt)."""
    model, processor, sizes, budget = families["qwen2-vl"]
    x = batch(processor, sizes, [0])
    with torch.no_grad():
        with prunekit.attach(model, "random", budget=budget, stage="projector_output") as h:
            logits = model(**x).logits
        kept = h.trace.kept_positions(0)
        ids = x["input_ids"]
        positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=x["mm_token_type_ids"],
                                                  image_grid_thw=x["image_grid_thw"], attention_mask=x["attention_mask"])
        features = model.model.get_image_features(x["pixel_values"], x["image_grid_thw"]).pooler_output[0]
        image = ids[0] == model.config.image_token_id
        slots = image.nonzero().squeeze(1)
        keep = ~image
        keep[slots[kept]] = True
        embeds = model.model.language_model.embed_tokens(ids[0])
        embeds[slots[kept]] = features[kept]
        lm = model.model.language_model(inputs_embeds=embeds[keep][None], position_ids=positions[:, :, keep])
        ref = model.lm_head(lm.last_hidden_state)
    assert logits.shape == ref.shape
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


class TwoCuts(prunekit.TokenPruner):
    """Cuts after vision blocks 0 and 1: a seeded random 3/4, then 1/2, of each image's live groups."""

    name = "two_cuts"

    def sites(self):
        return [prunekit.Site("vision_layer", 0), prunekit.Site("vision_layer", 1)]

    def prune(self, ctx):
        share = 0.75 if ctx.layer == 0 else 0.5
        return prunekit.Keep([torch.randperm(int(n), generator=ctx.generator(u))[: int(share * int(n))].sort().values
                              for u, n in enumerate(ctx.lengths)])


def qwen25_tower_by_hand(tower, x, kept_after: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The Qwen2.5-VL tower of one image run block by block, keeping after block b only the merge groups in
    ``kept_after[b]`` (global raster ids), with the windows and rotary rows rebuilt by hand. Returns the merged
    tokens in raster order of the surviving groups, their ids, and each cut's window sizes."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    grid = x["image_grid_thw"]
    window_index, cu_windows = get_vision_window_index(grid, tower.spatial_merge_size, tower.window_size, tower.patch_size)
    hidden = tower.patch_embed(x["pixel_values"])
    hidden = tower.permute_input_for_window_attn(hidden, window_index, hidden.shape[0])
    pos = tower.rotary_pos_emb(hidden, get_vision_position_ids(grid, tower.spatial_merge_size))
    pos = tuple(tower.permute_input_for_window_attn(p, window_index, hidden.shape[0]) for p in pos)
    group_of_row = window_index[torch.arange(hidden.shape[0]) // 4]
    window_of_row = torch.bucketize(torch.arange(hidden.shape[0]), cu_windows[1:].long(), right=True)
    windows, full, sizes = cu_windows, torch.tensor([0, hidden.shape[0]], dtype=torch.int32), []
    for i, block in enumerate(tower.blocks):
        hidden = block(hidden, cu_seqlens=full if i in tower.fullatt_block_indexes else windows, position_embeddings=pos)
        if i in kept_after:
            rows = torch.isin(group_of_row, kept_after[i])
            hidden, pos = hidden[rows], tuple(p[rows] for p in pos)
            group_of_row, window_of_row = group_of_row[rows], window_of_row[rows]
            counts = torch.unique_consecutive(window_of_row, return_counts=True)[1]
            windows = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
            full = torch.tensor([0, hidden.shape[0]], dtype=torch.int32)
            sizes.append(counts.tolist())
    order = torch.argsort(group_of_row[::4])  # window order -> raster order of the kept groups
    return tower.merger(hidden)[order], group_of_row[::4][order], sizes


@pytest.mark.parametrize("cuts", ["one", "two"])
def test_qwen25_window_attention_is_rebuilt_after_each_cut(families, cuts):
    """A cut inside Qwen2.5-VL's ViT leaves windows of different sizes: the windowed blocks must see exactly the
    surviving rows of each window, with their own rotary rows, after every cut (checked against a hand-run
    tower on the kept rows). Two cuts: the second one's rows are a subset of the first one's."""
    model, processor, sizes, budget = families["qwen2.5-vl"]
    x = batch(processor, sizes, [0])  # 224x224: 4 windows
    tower = model.model.visual
    strategy = TwoCuts() if cuts == "two" else prunekit.build_strategy(
        "random", budget=budget, stage="vision_layer", layer=0)
    with torch.no_grad(), prunekit.attach(model, strategy) as h:
        model(**x)
        events = h.trace.events
        out = tower(x["pixel_values"], grid_thw=x["image_grid_thw"]).pooler_output
    assert len(events) == (2 if cuts == "two" else 1)
    kept_after = {int(e.site.split("[")[1][:-1]): e.kept[0] for e in events}
    with torch.no_grad():
        merged, groups, windows = qwen25_tower_by_hand(tower, x, kept_after)
    assert torch.equal(groups, h.trace.kept_positions(0))
    torch.testing.assert_close(out[groups], merged, rtol=1e-5, atol=1e-5)
    assert all(len(w) > 1 and len(set(w)) > 1 for w in windows), "each cut should leave unequal windows"


def test_next_kept_positions_index_the_models_anyres_layout(families):
    """Invariant 3 on LLaVA-NeXT: a per-crop cut after the projector == the unpatched language model fed the
    unpruned image features (base crop, unpadded grid, newlines) at the trace's kept span positions."""
    model, processor, sizes, budget = families["llava-next"]
    x = batch(processor, sizes, [2])  # 200x150: unpadding removes rows of the high-resolution grid
    with torch.no_grad():
        features = model.model.get_image_features(x["pixel_values"], x["image_sizes"]).pooler_output[0]
        with prunekit.attach(model, "random", budget=budget, stage="projector_output") as h:
            logits = model(**x).logits
        t = h.trace
        kept = t.kept_positions(0)
        ids = x["input_ids"][0]
        slots = (ids == model.config.image_token_id).nonzero().squeeze(1)
        assert t.n_vanilla == [len(slots)] == [features.shape[0]]
        keep = ids != model.config.image_token_id
        keep[slots[kept]] = True
        embeds = model.model.language_model.embed_tokens(ids)
        embeds[slots] = features
        lm = model.model.language_model(inputs_embeds=embeds[keep][None],
                                        position_ids=torch.arange(int(keep.sum()))[None])
        ref = model.lm_head(lm.last_hidden_state)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    per_crop = budget // h.adapter.budget_units()
    newlines = (h.adapter.image_layouts([64] * 5, {"image_sizes": x["image_sizes"]})[0].source < 0).sum()
    crops = h.adapter.image_layouts([64] * 5, {"image_sizes": x["image_sizes"]})[0].units
    assert t.n_final[0] <= crops * per_crop + int(newlines)  # per-crop budget, minus unpadding, plus newlines


def test_flops_count_crops_and_patches(families):
    """FLOPs read the vision work off the trace: LLaVA-NeXT runs every crop through CLIP, Qwen 4 patches per
    merged token; keep-all costs exactly the unpruned count, and a cut costs less."""
    from prunekit.flops import FlopsModel, trace_flops

    for family in FAMILIES:
        model, processor, sizes, budget = families[family]
        x = batch(processor, sizes, [0])
        flops = FlopsModel.from_model(model)
        text = int(x["attention_mask"].sum()) - int((x["input_ids"] == model.config.image_token_id).sum())
        with torch.no_grad():
            with prunekit.attach(model, "keep_all") as h:
                model(**x)
            t = h.trace
            if family in ("llava-next", "llava-onevision"):
                assert t.vision_units == [x["pixel_values"].shape[1]] and t.vision_tokens == [t.vision_units[0] * 64]
            elif family == "internvl":  # 224x224: 4 tiles + thumbnail of 8x8 patches, 16 tokens each
                assert t.vision_units == [5] and t.vision_tokens == [80] and t.merge_size == 4
                assert t.vision_layer_counts[0].tolist() == [5 * 64] * len(model.model.vision_tower.encoder.layer)
            else:
                patches = int(x["image_grid_thw"].prod())
                assert t.vision_units == [1] and t.vision_tokens == [patches // 4] and t.merge_size == 4
                assert t.vision_layer_counts[0].tolist() == [patches] * len(model.model.visual.blocks)
            full = trace_flops(flops, t, 0, text, unpruned=True)
            assert trace_flops(flops, t, 0, text) == full
            with prunekit.attach(model, "random", budget=budget, stage="vision_layer", layer=1) as h:
                model(**x)
            cut = trace_flops(flops, h.trace, 0, text)
        assert cut["exact_vision"] < full["exact_vision"] and cut["exact_llm"] < full["exact_llm"], family


class _Signals(prunekit.TokenPruner):
    """Keeps everything; records what its context shows at one vision_layer site."""

    name = "signals_recorder"

    def __init__(self, layer):
        super().__init__()
        self.layer, self.seen = layer, {}

    def sites(self):
        return [prunekit.Site("vision_layer", self.layer)]

    def signals(self, site):
        return prunekit.Signals(rows=(prunekit.AttentionRows("mean", "mean"),), values=True)

    def prune(self, ctx):
        self.seen = dict(attention=ctx.attention("mean", "mean").clone(), values=ctx.values().clone(),
                         lengths=ctx.lengths.clone())
        return None


@pytest.mark.parametrize("images", [[0, 1], [0, 4], [2]], ids=["ragged", "equal", "one"])
@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_packed_vit_signals_equal_attention_computed_by_hand(families, family, images):
    """On a packed ViT the strategy sees, per image and merge group (raster order): the mean query's softmax over
    the image's keys summed over the group's 4 patches, and the group's mean value; with the q, k, v the block's
    own attention computed (windowed block on 2.5: the image's keys, not the window's). Images of different
    token counts (padded layout), of equal counts and a single image (no padding: the groups are read in place)."""
    import sys as _sys
    from transformers.vision_utils import get_vision_window_index

    model, processor, sizes, budget = families[family]
    x = batch(processor, sizes, images)  # 224x224 and 224x112: different token counts; twice 224x224; 200x150
    block = model.model.visual.blocks[1]
    captured = {}
    hook = block.attn.register_forward_pre_hook(
        lambda m, a, k: captured.update(hidden=a[0], pos=k["position_embeddings"]), with_kwargs=True)
    strategy = _Signals(1)
    try:
        with torch.no_grad(), prunekit.attach(model, strategy):
            model(**x)
    finally:
        hook.remove()
    attn = block.attn
    q, k, v = attn.qkv(captured["hidden"]).reshape(captured["hidden"].shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3)
    q, k = _sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision(q, k, *captured["pos"])
    grid = x["image_grid_thw"]
    rows = torch.arange(int(grid.prod(-1).sum()))
    if family == "qwen2.5-vl":
        tower = model.model.visual
        window_index, _ = get_vision_window_index(grid, tower.spatial_merge_size, tower.window_size, tower.patch_size)
        group = window_index[rows // 4]
    else:
        group = rows // 4
    start = 0
    for u, n in enumerate(grid.prod(-1).tolist()):
        sl = slice(start, start + n)
        qm = q[sl].mean(0)  # (H, d): the mean query of the image
        probs = torch.softmax(torch.einsum("hd,nhd->hn", qm, k[sl]) * attn.scaling, -1).mean(0)  # (n,)
        local = group[sl] - group[sl].min()
        want = torch.zeros(n // 4).index_add_(0, local, probs)
        value = torch.zeros(n // 4, *v.shape[1:]).index_add_(0, local, v[sl]) / 4
        torch.testing.assert_close(strategy.seen["attention"][u, : n // 4], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(strategy.seen["values"][u, :, : n // 4], value.transpose(0, 1), rtol=1e-5, atol=1e-6)
        start += n


@pytest.mark.parametrize("newlines", [True, False])
def test_next_span_tracks_vectorised_equal_the_loop(families, newlines):
    """LLaVA-NeXT's span (crops, unpadding, newlines) from per-crop kept sets: the vectorised path for tokens of
    one member each gives the same kept positions and members as the general loop, for random ragged cuts."""
    from prunekit.adapters import adapter_for
    from prunekit.runtime.layout import _span_track, _span_track_single
    from prunekit.trace import SampleTrack

    model, processor, sizes, budget = families["llava-next"]
    x = batch(processor, sizes, [2])  # 200x150: unpadding drops rows
    adapter = adapter_for(model)
    layout = adapter.image_layouts([64] * x["pixel_values"].shape[1], {"image_sizes": x["image_sizes"]})[0]
    span_of = torch.full((layout.units * layout.tokens,), -1, dtype=torch.long)
    placed = (layout.source >= 0).nonzero().squeeze(1)
    span_of[layout.source[placed]] = placed
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        tracks = []
        for _ in range(layout.units):
            track = SampleTrack.full([layout.tokens])
            track.select(torch.randperm(layout.tokens, generator=g)[: int(torch.randint(1, layout.tokens, (1,), generator=g))].sort().values)
            tracks.append(track)
        kept, members = _span_track(layout, tracks, span_of, newlines)
        fast_kept, fast_members = _span_track_single(layout, tracks, span_of, newlines)
        assert torch.equal(kept, fast_kept) and len(members) == len(fast_members)
        assert all(torch.equal(a, b) for a, b in zip(members, fast_members))
    assert bool((span_of < 0).any()) and bool((layout.source < 0).any())  # the case has unpadding and newlines


@pytest.mark.parametrize("lengths", [[6, 6], [6, 2, 4], [5]], ids=["equal", "ragged", "one"])
@pytest.mark.parametrize("calls", ["per_image", "per_window", "one_call"])
def test_packed_attention_calls_are_laid_out_per_image(lengths, calls):
    """A packed encoder's attention calls (per image, per window, or one flash call for all) become one
    zero-padded (images, H, n_max, d) tensor, row r of image u being flat row start_u + r; the live mask marks
    the real rows and is None when no image is padded."""
    from prunekit.runtime.packed import lay_out_calls, live_rows

    flat = torch.arange(sum(lengths) * 2 * 3, dtype=torch.float32).view(1, 2, sum(lengths), 3)  # (1, H, rows, d)
    bounds = torch.tensor([0] + lengths).cumsum(0)
    if calls == "per_image":
        pieces = list(flat.split(lengths, dim=2))
    elif calls == "per_window":  # windows of at most 2 rows inside each image
        pieces = [w for image in flat.split(lengths, dim=2) for w in image.split(2, dim=2)]
    else:
        pieces = [flat]
    out, live = lay_out_calls(pieces, bounds), live_rows(bounds)
    assert out.shape == (len(lengths), 2, max(lengths), 3) and out.is_contiguous()
    start = 0
    for u, n in enumerate(lengths):
        assert torch.equal(out[u, :, :n], flat[0, :, start : start + n])
        assert not out[u, :, n:].any()
        start += n
    if len(set(lengths)) == 1:
        assert live is None
    else:
        assert live.tolist() == [[r < n for r in range(max(lengths))] for n in lengths]

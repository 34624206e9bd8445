"""The runtime invariants (docs/architecture.md) 1-5 and 7 on a tiny LLaVA-1.5, for all four stages."""
import pytest
import torch
import torch.nn.functional as F

import prunekit
from prunekit import Keep, Site, TokenPruner
from prunekit.tiny import tiny_clip_text_dir
from helpers import batch, generate_positions, greedy, recompute_last_logits, tower_reference, vision_features

pytestmark = pytest.mark.contract  # the runtime contract: CI runs it on every transformers minor

B = 16  # budget: 16 of the tiny model's 64 visual tokens
N = 64
L_LAYERS = 4

class Progressive(TokenPruner):
    """Random halving inside the encoder after layers 0 and 1 (64 -> 32 -> 16), like a progressive schedule."""

    name = "progressive_random"

    def __init__(self):
        super().__init__(budget=B)

    def sites(self):
        return [Site("vision_layer", 0), Site("vision_layer", 1)]

    def prune(self, ctx):
        return Keep([torch.randperm(int(n), generator=ctx.generator(u))[: int(n) // 2].sort().values
                     for u, n in enumerate(ctx.lengths)])


PRUNING = {
    "random@vision_layer0": dict(name="random", budget=B, stage="vision_layer", layer=0),
    "pooling@vision_layer1": dict(name="pooling", budget=B, stage="vision_layer", layer=1),
    "progressive@vision_layer0+1": Progressive,
    "flowcut": dict(name="flowcut", budget=B),
    "random@vision_output": dict(name="random", budget=B),
    "random@projector_output": dict(name="random", budget=B, stage="projector_output"),
    "random@llm1": dict(name="random", budget=B, stage="llm_layer", layer=1),
    "random@llm2-compact": dict(name="random", budget=B, stage="llm_layer", layer=2, positions="compact"),
    "pooling@vision_output": dict(name="pooling", budget=B),
    "pooling@projector_output-original": dict(name="pooling", budget=B, stage="projector_output", positions="original"),
    "pooling@llm2": dict(name="pooling", budget=B, stage="llm_layer", layer=2),
    "fastv@llm2": dict(name="fastv", budget=B, layer=2),
    "fastv-all@llm1": dict(name="fastv", budget=B, layer=1, query="all"),
    "pdrop@llm1+2+3": dict(name="pdrop", budget=B, convention="n_final", layer_list=[1, 2, 3]),
    "fastervlm": dict(name="fastervlm", budget=B),
    "divprune@projector_output": dict(name="divprune", budget=B),
    "dart@llm2": dict(name="dart", budget=B, layer=2),
    "vispruner": dict(name="vispruner", budget=B),
    "vispruner-rho0.75": dict(name="vispruner", budget=B, important_ratio=0.75),
    "mmtok": dict(name="mmtok", budget=B),
    "cdpruner": dict(name="cdpruner", budget=B, text_encoder=str(tiny_clip_text_dir())),
}
REORDERED = {  # VisionZip: [CLS] first (standing for no patch), then dominant patches, then merged contextual tokens
    "visionzip": dict(name="visionzip", budget=B),
    "visionzip-no-cls-mean": dict(name="visionzip", budget=B, cls=False, merge="mean"),
}
SPARSE = {  # SparseVLM: text raters, recycled (merged) tokens placed after the kept ones, per-version positions
    "sparsevlm-v1.5@llm1+2+3": dict(name="sparsevlm", budget=B),
    "sparsevlm-v2@llm1+2+3": dict(name="sparsevlm", version="v2", budget=B),
    "sparsevlm-v1@llm1+2+3": dict(name="sparsevlm", version="v1", scale=1.5),
}
LLM_AVG = {"pdrop@llm1+2+3": (N + 40 + 25 + B) / L_LAYERS}  # multi-stage n_avg (one cut: the formula below)
MASKED = {  # pruned tokens masked out, not removed: same outputs, full-length sequences
    "fastv-mask@llm2": dict(name="fastv", budget=B, layer=2, variant="mask"),
}
KEEP_ALL = {
    "keep_all@vision_layer1": dict(name="keep_all", stage="vision_layer", layer=1),
    "keep_all@vision_output": dict(name="keep_all"),
    "keep_all@projector_output": dict(name="keep_all", stage="projector_output"),
    "keep_all@llm0": dict(name="keep_all", stage="llm_layer", layer=0),
    "keep_all@llm2": dict(name="keep_all", stage="llm_layer", layer=2),
}
ALL = {**PRUNING, **KEEP_ALL, **MASKED, **SPARSE, **REORDERED}


def attach(model, spec, processor=None):
    """The processor serves strategies that read the instruction before the LLM (MMTok, CDPruner)."""
    return prunekit.attach(model, spec() if isinstance(spec, type) else spec, processor=processor)


def stage_of(spec) -> str:
    if isinstance(spec, type) or spec["name"] == "flowcut":
        return "vision_layer"
    if spec["name"] in ("fastv", "pdrop", "dart"):
        return "llm_layer"
    return spec.get("stage", "vision_output")


def hooks(model):
    """Every forward hook on the model (transformers installs some of its own) and instance overrides."""
    found = {(name, kind, key) for name, m in model.named_modules()
             for kind, d in (("pre", m._forward_pre_hooks), ("post", m._forward_hooks)) for key in d}
    return found | ({("", "attr", "generate")} if "generate" in model.__dict__ else set())


# 1. Detached == never attached -------------------------------------------------------------------
@pytest.mark.parametrize("spec", list(ALL.values()), ids=list(ALL))
def test_detach_restores_the_model_exactly(model, processor, spec):
    x = batch(processor, [0, 1])
    logits = model(**x).logits
    tokens, _ = greedy(model, x)
    before = hooks(model)
    handle = attach(model, spec, processor)
    assert hooks(model) > before
    model(**x)
    greedy(model, x)
    handle.detach()
    assert hooks(model) == before
    assert torch.equal(model(**x).logits, logits)
    assert torch.equal(greedy(model, x)[0], tokens)


# 2. Keep-all == vanilla ---------------------------------------------------------------------------
@pytest.mark.parametrize("spec", list(KEEP_ALL.values()), ids=list(KEEP_ALL))
def test_keep_all_gives_identical_logits(model, processor, spec):
    x = batch(processor, [0, 1, 2])  # left padding included
    logits = model(**x).logits
    tokens, step_logits = greedy(model, x)
    with attach(model, spec, processor) as h:
        assert torch.equal(model(**x).logits, logits)
        assert h.trace.n_final == [N] * 3
        t2, l2 = greedy(model, x)
    assert torch.equal(t2, tokens)
    assert torch.equal(l2, step_logits)


# 3. Pruning before the LLM == reduced input -------------------------------------------------------
def reduced_reference(model, x, trace, features_per_sample, policy):
    """Logits of the unpatched language model fed only the kept features (built without prunekit)."""
    lm, ids, mask = model.model.language_model, x["input_ids"], x["attention_mask"]
    img = ids == model.config.image_token_id
    rows = []
    for b in range(ids.shape[0]):
        slots = img[b].nonzero().squeeze(1)
        keep = ~img[b]
        keep[slots[trace.kept_positions(b)]] = True
        embeds = lm.embed_tokens(ids[b])
        embeds[slots[trace.kept_positions(b)]] = features_per_sample[b].to(embeds.dtype)
        pos = torch.arange(ids.shape[1])
        if policy == "compact":
            pos = torch.arange(int(keep.sum()))
        else:
            pos = pos[keep]
        rows.append((embeds[keep], mask[b][keep], pos))
    embeds = torch.stack([r[0] for r in rows])
    out = lm(inputs_embeds=embeds, attention_mask=torch.stack([r[1] for r in rows]),
             position_ids=torch.stack([r[2] for r in rows]))
    return model.lm_head(out.last_hidden_state)


def pooled(features, budget):
    side = int(features.shape[1] ** 0.5)
    grid = features.transpose(1, 2).reshape(features.shape[0], -1, side, side)
    k = int(budget ** 0.5)
    return F.adaptive_avg_pool2d(grid, (k, k)).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("key", [k for k in PRUNING if "llm" not in k])
def test_pre_llm_pruning_equals_reduced_input(model, processor, key):
    spec = PRUNING[key]
    x = batch(processor, [0, 3])  # same prompt length: the reference needs no re-padding
    feats = vision_features(model, x["pixel_values"])
    proj = model.model.multi_modal_projector
    with attach(model, spec, processor) as h:
        logits = model(**x).logits
        trace = h.trace
    if stage_of(spec) == "vision_layer":
        kept = proj(tower_reference(model, x["pixel_values"], vision_cuts(spec, h)))
    elif spec["name"] == "pooling":
        kept = proj(pooled(feats, B)) if spec.get("stage") is None else pooled(proj(feats), B)
    else:
        kept = torch.stack([proj(feats)[b, trace.kept_positions(b)] for b in range(2)])
    ref = reduced_reference(model, x, trace, kept, h.strategy.position_policy)
    assert logits.shape == ref.shape == (2, x["input_ids"].shape[1] - (N - B), ref.shape[-1])
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def vision_cuts(spec, handle):
    """The encoder reductions a vision_layer strategy made, applied by hand: pooling is recomputed
    independently; selections replay each site's recorded indices (into that site's input tokens)."""
    if not isinstance(spec, type) and spec["name"] == "pooling":
        return {spec["layer"]: lambda p: pooled(p, B)}
    cuts = {}
    for site, keep in handle.decisions.items():
        if site.stage is prunekit.Stage.VISION_LAYER and keep is not None:
            cuts[site.layer] = lambda p, idx=keep.indices: torch.stack([p[b, idx[b]] for b in range(len(idx))])
    return cuts


# 4. Cache == recompute (with the prefill's decisions replayed) -----------------------------------
CACHED = {**PRUNING, **MASKED, **SPARSE, **REORDERED}


@pytest.mark.parametrize("spec", list(CACHED.values()), ids=list(CACHED))
def test_cached_generation_equals_recompute_with_replay(model, processor, spec):
    x = batch(processor, [0, 1])
    steps = 4
    with attach(model, spec, processor) as h:
        tokens, step_logits = greedy(model, x, steps)
        kept = [h.trace.kept_positions(b) for b in range(2)]
        with h.replay():
            for t in range(steps):
                out = recompute_last_logits(model, x, tokens[:, :t])
                torch.testing.assert_close(out, step_logits[:, t], rtol=1e-5, atol=1e-5)
                assert torch.equal(out.argmax(-1), tokens[:, t])
                assert all(torch.equal(h.trace.kept_positions(b), kept[b]) for b in range(2))
                assert h.trace.replayed


def test_replay_needs_a_prefill(model):
    with prunekit.attach(model, "random", budget=B) as h:
        with pytest.raises(prunekit.PruningError, match="nothing to replay"):
            with h.replay():
                pass


# 5. Batch independence ----------------------------------------------------------------------------
@pytest.mark.parametrize("spec", list(ALL.values()), ids=list(ALL))
def test_batch_of_four_with_padding_equals_batch_of_one(model, processor, spec):
    x4 = batch(processor, [0, 1, 2, 3])
    assert (x4["attention_mask"] == 0).any(), "the batch must be left-padded"
    # positions from the mask, as generate passes them: DART's key norms are taken after RoPE, so absolute
    # positions matter to it (a plain forward would number the left padding too)
    with attach(model, spec, processor) as h:
        logits4 = model(**x4, position_ids=generate_positions(x4["attention_mask"])).logits[:, -1]
        kept4 = [h.trace.kept_positions(b) for b in range(4)]
        members4 = [h.trace.members(b) for b in range(4)]
        tokens4, _ = greedy(model, x4)
        for b in range(4):
            x1 = batch(processor, [b])
            torch.testing.assert_close(model(**x1).logits[:, -1], logits4[b : b + 1], rtol=1e-5, atol=1e-5)
            assert torch.equal(h.trace.kept_positions(0), kept4[b])
            assert all(torch.equal(m1, m4) for m1, m4 in zip(h.trace.members(0), members4[b]))
            assert torch.equal(greedy(model, x1)[0], tokens4[b : b + 1])


# 7. Honest accounting -----------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(PRUNING))
def test_trace_counts_match_the_budget_and_the_sequence(model, processor, key):
    spec = PRUNING[key]
    x = batch(processor, [0, 3])
    with attach(model, spec, processor) as h:
        logits = model(**x).logits
    t = h.trace
    inside = stage_of(spec) == "llm_layer"
    assert t.n_vanilla == [N, N]
    assert t.n_final == [B, B]
    assert [len(t.kept_positions(b)) for b in range(2)] == [B, B]
    if not inside:
        assert t.n_in == [B, B] and t.n_avg == [B, B]
        assert t.budget.convention == "n_in"
    else:
        layer = spec.get("layer")
        assert t.n_in == [N, N]
        assert t.n_avg == [LLM_AVG.get(key) or (layer * N + (L_LAYERS - layer) * B) / L_LAYERS] * 2
        assert t.budget.convention == "n_final"
    assert logits.shape[1] == x["input_ids"].shape[1] - (N - B)  # tokens physically removed
    for b in range(2):
        kept = t.kept_positions(b)
        assert torch.equal(kept, kept.sort().values) and kept.unique().numel() == B
        assert sum(len(m) for m in t.members(b)) >= B
        assert all(int(k) in m.tolist() for k, m in zip(kept, t.members(b)))


def test_trace_keeps_each_sites_survivors_for_progressive_overlays(model, processor):
    with prunekit.attach(model, Progressive()) as h:
        model(**batch(processor, [0, 1]))
    t = h.trace
    assert [ev.site for ev in t.events] == ["vision_layer[0]", "vision_layer[1]"]
    for b in range(2):
        first, second = t.kept_after("vision_layer[0]", b), t.kept_after("vision_layer[1]", b)
        assert len(first) == N // 2 and len(second) == B
        assert set(second.tolist()) <= set(first.tolist())
        assert torch.equal(second, t.kept_positions(b))
    with pytest.raises(KeyError, match="no pruning event at 'llm_layer\\[2\\]'"):
        t.kept_after("llm_layer[2]", 0)

"""FlowCut (docs/strategies/docs/strategies/flowcut.md): hand-worked score / count / schedule cases and test vectors T1-T12."""
import math

import pytest
import torch

import prunekit
from prunekit import PruneContext, Site, Stage, build_strategy
from prunekit.scoring import RELAYS, SCORES, Relay, ScoreInputs, get_score, register_relay, register_score
from prunekit.ops import select_top
from prunekit.strategies.flowcut import adaptive_count
from helpers import batch, tower_reference
from prunekit.compat import LOAD_KWARGS

# --- a synthetic encoder: per-layer signals fed straight to the strategy ---------------------------


class FakeSignals:
    def __init__(self, a, v, cls_v):
        self.a, self.v, self.cls_v = a, v, cls_v

    def attention(self, query, heads):
        return self.a

    def values(self):
        return self.v

    def query_values(self, query):
        return self.cls_v

    def prefix_values(self):
        return self.cls_v[:, :, None]


class FakeAdapter:
    """The adapter facts FlowCut binds to: a LLaVA-1.5-like tower (one unit per image, [CLS], not packed)."""

    vision_prefix_tokens, packed_vision, num_llm_layers = 1, False, 32

    def __init__(self, layers):
        self.vision_feature_layer = layers - 2  # LLaVA reads hidden_states[-2]

    def budget_units(self):
        return 1


def score_by_hand(a, v, cls_v):
    """FlowCut's score of every live patch, written out from docs/strategies/docs/strategies/flowcut.md: S = (a / sum a +
    s / sum s) * nu, s_j = head mean of softmax over [CLS, patches] of v_cls . v_j (unscaled), nu_j = sum_d
    |mean_h v_j| (one unit, every patch live)."""
    logits = torch.cat([(cls_v * cls_v).sum(-1, keepdim=True), torch.einsum("uhnd,uhd->uhn", v, cls_v)], -1)
    s = logits.softmax(-1)[..., 1:].mean(1)
    nu = v.mean(1).abs().sum(-1)
    return (a / a.sum(-1, keepdim=True) + s / s.sum(-1, keepdim=True)) * nu


def signals_for(lengths, kind, generator, heads=2, dim=4, dtype=torch.float32):
    """One layer's signals for units with ``lengths`` live patches (zero padded)."""
    n = int(lengths.max())
    logits = torch.randn(len(lengths), n + 1, generator=generator) * 4
    v = torch.randn(len(lengths), heads, n, dim, generator=generator)
    cls_v = torch.randn(len(lengths), heads, dim, generator=generator)
    return layer_signals(lengths, kind, logits, v, cls_v, dtype)


def layer_signals(lengths, kind, logits, v, cls_v, dtype):
    n = logits.shape[1] - 1
    live = torch.arange(n)[None] < lengths[:, None]
    if kind == "uniform":
        a = live.float() / (lengths[:, None] + 1)
    else:  # concentrated: a few patches take most of the CLS attention
        logits = logits.clone()
        logits[:, 1:] = logits[:, 1:].masked_fill(~live, float("-inf"))
        a = logits.softmax(-1)[:, 1:]
    v = v * live[:, None, :, None]
    return a.to(dtype), v.to(dtype), cls_v.to(dtype)


def simulate(strategy, n_patches=576, layers=24, units=1, kind="concentrated", seed=0, dtype=torch.float32):
    """Run the strategy's schedule over a synthetic encoder whose per-layer signals are fixed per original
    patch (gathered to the survivors). Returns [(layer, counts after)] and each unit's final survivors."""
    strategy.bind(FakeAdapter(layers))
    g = torch.Generator().manual_seed(seed)
    alive = [torch.arange(n_patches) for _ in range(units)]
    history = []
    for site in strategy.sites():
        logits = torch.randn(units, n_patches + 1, generator=g) * 4
        v = torch.randn(units, 2, n_patches, 4, generator=g)
        cls_v = torch.randn(units, 2, 4, generator=g)
        lengths = torch.tensor([len(x) for x in alive])
        n = int(lengths.max())
        pad = [torch.cat([x, x.new_zeros(n - len(x))]) for x in alive]
        cur_logits = torch.stack([torch.cat([logits[u, :1], logits[u, 1:][pad[u]]]) for u in range(units)])
        cur_v = torch.stack([v[u][:, pad[u]] for u in range(units)])
        a, cv, cls = layer_signals(lengths, kind, cur_logits, cur_v, cls_v, dtype)
        ctx = PruneContext(site=site, tokens=torch.zeros(units, n, 1), lengths=lengths,
                           grids=[None] * units, sample_of=list(range(units)), budget=strategy.budget,
                           signals=FakeSignals(a, cv, cls))
        keep = strategy.prune(ctx)
        if keep is not None:
            alive = [alive[u][keep.indices[u]] for u in range(units)]
            history.append((site.layer, [len(x) for x in alive]))
    return history, alive


# --- hand-worked cases -------------------------------------------------------------------------------

def test_score_by_hand():
    live = torch.ones(1, 4, dtype=torch.bool)
    a = torch.tensor([[0.1, 0.2, 0.3, 0.2]])  # sums to 0.8 -> [.125, .25, .375, .25]
    s = torch.tensor([[0.1, 0.1, 0.1, 0.1]])  # -> [.25] * 4
    nu = torch.tensor([[1.0, 2.0, 1.0, 4.0]])
    score = get_score("flowcut")(ScoreInputs(a, s, nu, live))
    torch.testing.assert_close(score, torch.tensor([[0.375, 1.0, 0.625, 2.0]]))
    attention_only = get_score("flowcut")(ScoreInputs(a, None, None, live))
    torch.testing.assert_close(attention_only, torch.tensor([[0.125, 0.25, 0.375, 0.25]]))
    # T7: scaling the attention leaves the score unchanged
    torch.testing.assert_close(get_score("flowcut")(ScoreInputs(a * 7.3, s, nu, live)), score)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prune_count_by_hand(dtype):
    live = torch.ones(1, 4, dtype=torch.bool)
    # p = [.5, .5, 0, 0]: H = ln 2, rho = ln 2 / ln 4 = 0.5 -> (4 - 1) / sqrt(4) * (1 - 0.25) = 1.125
    a = torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=dtype).float()
    torch.testing.assert_close(adaptive_count(a, live, torch.tensor([3.0]), 4, 2.0), torch.tensor([1.125]))
    # T5: uniform attention -> rho = 1 -> nothing dropped before the final cut
    uniform = torch.full((1, 4), 0.2, dtype=dtype).float()
    assert float(adaptive_count(uniform, live, torch.tensor([3.0]), 4, 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_prune_count_rounds_half_to_even_and_survives_zeros():
    """T5/T6: one-hot attention (exact zeros) gives rho = 0, P = (N - T) / sqrt(rpl), rounded half-even."""
    strategy = build_strategy("flowcut", budget=1, final_layer=10)
    for n, expected in ((6, 2), (8, 4), (10, 4)):  # 2.5 -> 2, 3.5 -> 4, 4.5 -> 4
        live = torch.ones(1, n, dtype=torch.bool)
        a = torch.zeros(1, n)
        a[0, 3] = 1.0
        count = strategy.prune_counts(a, live, torch.tensor([n - 1]), rpl=4)  # excess N - T = n - 1
        assert count.tolist() == [expected]
    # rpl = 0 forces the cut to the target: 10 tokens, T = 3
    assert strategy.prune_counts(a, live, torch.tensor([7]), rpl=0).tolist() == [7]


def test_uniform_schedule_splits_the_excess_evenly():
    strategy = build_strategy("flowcut", budget=64, schedule="uniform")
    history, _ = simulate(strategy, n_patches=576, layers=24)
    # 11 prune layers (rpl = 20, 18, ..., 0): 512 / 11, then the rest spread evenly, exactly 64 at the end
    assert [layer for layer, _ in history] == list(range(1, 22, 2))
    drops = [before - after for (before,), (after,) in zip([[576]] + [c for _, c in history], [c for _, c in history])]
    assert max(drops) - min(drops) <= 1 and history[-1][1] == [64]


# --- T4: schedule shape ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["concentrated", "uniform"])
def test_schedule_is_monotone_and_ends_exactly_at_the_budget(kind):
    strategy = build_strategy("flowcut", budget=64)
    history, _ = simulate(strategy, kind=kind, units=3)
    layers = [layer for layer, _ in history]
    assert all((21 - layer) % 2 == 0 for layer in layers)  # prunes only where rpl is even
    assert layers[-1] == 21 and history[-1][1] == [64, 64, 64]  # the forced cut at L-3
    counts = [[576] * 3] + [c for _, c in history]
    for before, after in zip(counts, counts[1:]):
        assert all(b >= a >= 64 for b, a in zip(before, after))
    if kind == "concentrated":
        assert len(layers) > 3  # progressive: several layers drop tokens
    else:
        assert layers == [21]  # rho = 1: nothing leaves before the final cut


def test_single_layer_and_interval_knobs():
    history, _ = simulate(build_strategy("flowcut", budget=64, schedule="single_layer"))
    assert [layer for layer, _ in history] == [21]
    history, _ = simulate(build_strategy("flowcut", budget=64, interval=3))
    assert all((21 - layer) % 3 == 0 for layer, _ in history) and history[-1] == (21, [64])
    history, _ = simulate(build_strategy("flowcut", budget=64, final_layer=15))
    assert history[-1] == (15, [64])


def test_ema_with_constant_scores_equals_the_score():
    """T8: C = S at the first scored layer, and stays S when every layer scores the same."""
    strategy = build_strategy("flowcut", budget=4)
    strategy.bind(FakeAdapter(8))  # final cut after layer 5
    lengths = torch.tensor([16])
    a, v, cls_v = signals_for(lengths, "uniform", torch.Generator().manual_seed(1))  # rho = 1: no early drops
    live = torch.ones(1, 16, dtype=torch.bool)
    for layer in range(5):
        ctx = PruneContext(site=Site(Stage.VISION_LAYER, layer), tokens=torch.zeros(1, 16, 1), lengths=lengths,
                           grids=[None], sample_of=[0], budget=strategy.budget, signals=FakeSignals(a, v, cls_v))
        assert strategy.prune(ctx) is None
        torch.testing.assert_close(strategy.cumulative(live), score_by_hand(a, v, cls_v))
    # and with changing scores the history weight mixes them: C = 0.5 C + 0.5 S
    previous = strategy.cumulative(live).clone()
    v2 = v.flip(2)
    ctx = PruneContext(site=Site(Stage.VISION_LAYER, 5), tokens=torch.zeros(1, 16, 1), lengths=lengths,
                       grids=[None], sample_of=[0], budget=strategy.budget, signals=FakeSignals(a, v2, cls_v))
    current = score_by_hand(a, v2, cls_v)
    keep = strategy.prune(ctx)
    mixed = 0.5 * previous + 0.5 * current
    assert torch.equal(keep.indices[0], select_top(mixed, live, torch.tensor([4]))[0])


def test_layers_scored_together_at_the_cut_equal_the_ema_layer_by_layer():
    """The layers between two cuts are scored in one stacked call when the cut comes (issue 24). The EMA must
    be the one worked out layer by layer, C = 0.5 C + 0.5 S_l in layer order, with every layer's own signals,
    and bit-identical to folding each layer in as it arrives. Three units of different lengths."""
    lengths = torch.tensor([16, 11, 13])
    live = torch.arange(16)[None] < lengths[:, None]
    g = torch.Generator().manual_seed(7)
    layers = [signals_for(lengths, "uniform", g) for _ in range(6)]  # uniform: rho = 1, only the final cut
    deferred, eager = build_strategy("flowcut", budget=4), build_strategy("flowcut", budget=4)
    keeps = []
    for strategy, fold_each_layer in ((deferred, False), (eager, True)):
        strategy.bind(FakeAdapter(8))  # final cut after layer 5
        for layer, (a, v, cls_v) in enumerate(layers):
            ctx = PruneContext(site=Site(Stage.VISION_LAYER, layer), tokens=torch.zeros(3, 16, 1), lengths=lengths,
                               grids=[None] * 3, sample_of=[0, 1, 2], budget=strategy.budget,
                               signals=FakeSignals(a, v, cls_v))
            keep = strategy.prune(ctx)
            if fold_each_layer and keep is None:
                strategy.cumulative(live)
        keeps.append(keep)
    by_hand = None
    for a, v, cls_v in layers:
        s = torch.stack([torch.nn.functional.pad(  # each unit alone, over its live patches, zero past them
            score_by_hand(a[u : u + 1, :n], v[u : u + 1, :, :n], cls_v[u : u + 1])[0], (0, 16 - n))
            for u, n in enumerate(lengths.tolist())])
        by_hand = s if by_hand is None else 0.5 * by_hand + 0.5 * s
    expected = select_top(by_hand, live, torch.tensor([4, 4, 4]))
    for keep in keeps:
        assert all(torch.equal(k, e) for k, e in zip(keep.indices, expected))
    assert torch.equal(deferred.cumulative(torch.ones(3, 4, dtype=torch.bool)),
                       eager.cumulative(torch.ones(3, 4, dtype=torch.bool)))


def test_stacked_scoring_in_chunks_equals_one_call(monkeypatch):
    """A stacked call takes at most STACK_ELEMENTS values (the bound on its extra memory); scoring the pending
    layers one per chunk must give bit-for-bit the C of scoring them all in one call."""
    import prunekit.strategies.flowcut as flowcut_module

    lengths = torch.tensor([16, 11, 13])
    live = torch.arange(16)[None] < lengths[:, None]
    g = torch.Generator().manual_seed(3)
    layers = [signals_for(lengths, "uniform", g) for _ in range(5)]
    results = []
    for stack_elements in (flowcut_module.STACK_ELEMENTS, 1):  # 1: every layer in a chunk of its own
        monkeypatch.setattr(flowcut_module, "STACK_ELEMENTS", stack_elements)
        strategy = build_strategy("flowcut", budget=4)
        strategy.bind(FakeAdapter(8))
        for layer, (a, v, cls_v) in enumerate(layers):
            ctx = PruneContext(site=Site(Stage.VISION_LAYER, layer), tokens=torch.zeros(3, 16, 1), lengths=lengths,
                               grids=[None] * 3, sample_of=[0, 1, 2], budget=strategy.budget,
                               signals=FakeSignals(a, v, cls_v))
            assert strategy.prune(ctx) is None  # layers 0-4: rho = 1, nothing leaves before the final cut
        assert len(strategy._pending) == 5
        results.append(strategy.cumulative(live))
    assert torch.equal(results[0], results[1])


def test_batch_coupled_flag_reproduces_the_batch_max():
    """T10 parity flag: one count per batch (the max over images); the default counts per image."""
    per_image, _ = simulate(build_strategy("flowcut", budget=64), units=3, seed=3)
    coupled, _ = simulate(build_strategy("flowcut", budget=64, batch_coupled=True), units=3, seed=3)
    first_per_image, first_coupled = per_image[0][1], coupled[0][1]
    assert len(set(first_per_image)) > 1  # images drop different counts on their own
    assert len(set(first_coupled)) == 1 and first_coupled[0] == min(first_per_image)


def test_selection_is_permutation_equivariant():
    """T11: permuting the patches (with their signals) permutes the kept set."""
    strategy = build_strategy("flowcut", budget=10, final_layer=0)
    strategy.bind(FakeAdapter(4))
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([40])
    a, v, cls_v = signals_for(lengths, "concentrated", g)
    perm = torch.randperm(40, generator=g)

    def keep(a, v):
        ctx = PruneContext(site=Site(Stage.VISION_LAYER, 0), tokens=torch.zeros(1, 40, 1), lengths=lengths,
                           grids=[None], sample_of=[0], budget=strategy.budget, signals=FakeSignals(a, v, cls_v))
        return set(strategy.prune(ctx).indices[0].tolist())

    base, permuted = keep(a, v), keep(a[:, perm], v[:, :, perm])
    assert {int(perm[i]) for i in permuted} == base


def test_ties_break_to_the_lower_index():
    live = torch.ones(1, 5, dtype=torch.bool)
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5]])
    assert select_top(scores, live, torch.tensor([2]))[0].tolist() == [1, 2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_signals_keep_almost_the_same_tokens(dtype):
    """T12: signals rounded to bf16 / fp16 keep sets with Jaccard >= 0.95 against fp32."""
    full, (full_kept,) = simulate(build_strategy("flowcut", budget=192), seed=7)
    half, (half_kept,) = simulate(build_strategy("flowcut", budget=192), seed=7, dtype=dtype)
    assert full[-1][1] == half[-1][1] == [192]
    a, b = set(full_kept.tolist()), set(half_kept.tolist())
    assert len(a & b) / len(a | b) >= 0.95


def test_unknown_knobs_name_the_choices():
    with pytest.raises(KeyError, match="unknown relay 'clss'.*cls.*Did you mean 'cls'"):
        build_strategy("flowcut", relay="clss")
    with pytest.raises(KeyError, match="unknown score function"):
        build_strategy("flowcut", score="nope")
    with pytest.raises(ValueError, match="unknown schedule"):
        build_strategy("flowcut", schedule="cosine")
    with pytest.raises(ValueError, match="history_weight"):
        build_strategy("flowcut", history_weight=1.0)


def test_a_registered_score_function_plugs_in_by_name(model, processor):
    @register_score("test_value_norm_only")
    def value_norm_only(x):
        return x.value_norm

    try:
        with prunekit.attach(model, "flowcut", budget=8, score="test_value_norm_only") as h:
            model(**batch(processor, [0]))
        assert h.trace.n_final == [8] and h.strategy.params()["score"] == "test_value_norm_only"
    finally:
        SCORES.pop("test_value_norm_only")


# --- on the tiny LLaVA (6 encoder layers: features at layer 4, final cut after layer 3) -------------

@pytest.mark.parametrize("budget", [1, 8, 16, 63, 64])
def test_exact_count_raster_order_and_readout_features(model, processor, budget):
    """T1-T3: exactly T patches per image (none pruned at T = N), strictly increasing positions, CLS never
    among them, and each feature is the read-out state of the patch its position names."""
    x = batch(processor, [0, 1, 2])
    calls = []
    proj = model.model.multi_modal_projector
    hook = proj.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    try:
        with prunekit.attach(model, "flowcut", budget=budget) as h:
            model(**x)
    finally:
        hook.remove()
    t = h.trace
    assert t.n_final == [budget] * 3 and calls == [(3, budget, 64)]  # one batched projector call
    if budget == 64:
        assert t.events == []
    cuts = {}
    for site, keep in h.decisions.items():
        assert site.layer <= 3
        if keep is not None:
            cuts[site.layer] = lambda p, idx=keep.indices: torch.stack([p[b, idx[b]] for b in range(3)])
    reference = tower_reference(model, x["pixel_values"], cuts)
    for b in range(3):
        kept = t.kept_positions(b)
        assert bool((kept[1:] > kept[:-1]).all()) and 0 <= int(kept.min()) and int(kept.max()) < 64
    with prunekit.attach(model, "flowcut", budget=budget):
        feats = model.model.get_image_features(pixel_values=x["pixel_values"], vision_feature_layer=-2,
                                               vision_feature_select_strategy="default").pooler_output
    # the features reaching the LM are the projected read-out states of the kept patches, in that order
    for b in range(3):
        torch.testing.assert_close(feats[b][t.kept_positions(b)], proj(reference)[b], rtol=1e-5, atol=1e-5)


def test_signals_come_from_one_attention_row_and_the_tower_stays_on_sdpa(model, processor):
    with prunekit.attach(model, "flowcut", budget=8) as h:
        model(**batch(processor, [0]))
        probe = h.probe
        assert {which.query for (_, which) in probe.rows} == {"first"}
        assert all(rows.shape == (1, 65) for rows in probe.rows.values())  # 1 x N per layer, no N x N
        assert model.config.vision_config._attn_implementation == "prunekit_sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_mean_query_relay_and_ablation_knobs_run_end_to_end(model, processor):
    x = batch(processor, [0, 1])
    for knobs in (dict(relay="mean_query"), dict(relay="mean_hidden"), dict(semantic_term=False, value_norm_term=False),
                  dict(history_weight=0.0, schedule="single_layer"), dict(schedule="uniform", interval=1),
                  dict(semantic_scaled=True, entropy_exponent=1.0), dict(batch_coupled=True)):
        with prunekit.attach(model, "flowcut", budget=8, **knobs) as h:
            model.generate(**x, max_new_tokens=2, do_sample=False)
        assert h.trace.n_final == [8, 8], knobs


def test_a_registered_relay_plugs_in_by_name(model, processor):
    register_relay("test_mean_no_value", Relay(query="mean", value=None))  # no semantic reference
    try:
        with prunekit.attach(model, "flowcut", budget=8, relay="test_mean_no_value") as h:
            model(**batch(processor, [0]))
            assert {which.query for (_, which) in h.probe.rows} == {"mean"}
        assert h.trace.n_final == [8]
    finally:
        RELAYS.pop("test_mean_no_value")


def test_semantic_term_and_entropy_exponent_by_hand():
    from prunekit.strategies.flowcut import semantic_attention

    r = torch.tensor([[[1.0, 0, 0, 0]]])  # (U=1, H=1, d=4): relay value; CLS value = r as well
    values = torch.tensor([[[[1.0, 0, 0, 0], [0, 0, 0, 0]]]])  # two patches: logits 1 and 0 (CLS: 1)
    live = torch.ones(1, 2, dtype=torch.bool)
    e = math.e
    torch.testing.assert_close(semantic_attention(r, r[:, :, None], values, live, scaled=False),
                               torch.tensor([[e / (2 * e + 1), 1 / (2 * e + 1)]]))
    es = math.exp(0.5)  # scaled by 1/sqrt(4)
    torch.testing.assert_close(semantic_attention(r, r[:, :, None], values, live, scaled=True),
                               torch.tensor([[es / (2 * es + 1), 1 / (2 * es + 1)]]))
    # exponent 1: rho = 0.5 -> (4 - 1) / sqrt(4) * (1 - 0.5) = 0.75
    a = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(adaptive_count(a, torch.ones(1, 4, dtype=torch.bool), torch.tensor([3.0]), 4, 1.0),
                               torch.tensor([0.75]))


@pytest.fixture(scope="module")
def sharp_model(tiny_dir):
    """The tiny LLaVA with sharper encoder attention (q, k scaled): FlowCut then prunes progressively,
    with different counts per image after layer 1."""
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(tiny_dir, **LOAD_KWARGS).eval()
    with torch.no_grad():
        for layer in m.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight *= 6
            layer.self_attn.k_proj.weight *= 6
    return m


def test_progressive_ragged_schedule_on_a_model_is_batch_independent_and_cache_exact(sharp_model, processor):
    from helpers import greedy, recompute_last_logits

    model = sharp_model
    x4 = batch(processor, [0, 1, 2, 3])
    with prunekit.attach(model, "flowcut", budget=8) as h:
        logits4 = model(**x4).logits[:, -1]
        t = h.trace
        assert [ev.site for ev in t.events] == ["vision_layer[1]", "vision_layer[3]"]  # rpl = 2, then 0
        after1 = t.events[0].n_out
        assert len(set(after1)) > 1 and all(8 < n < 64 for n in after1)  # progressive, per image
        assert t.vision_layer_counts[:, 2].tolist() == after1 and t.vision_layer_counts[:, 4:].eq(8).all()
        assert t.n_final == [8] * 4
        kept4 = [t.kept_positions(b) for b in range(4)]
        tokens4, step_logits = greedy(model, x4, 3)
        for b in range(4):  # T10: the same keep set alone as in the padded batch
            x1 = batch(processor, [b])
            torch.testing.assert_close(model(**x1).logits[:, -1], logits4[b: b + 1], rtol=1e-5, atol=1e-5)
            assert torch.equal(h.trace.kept_positions(0), kept4[b])
        model(**x4)
        with h.replay():  # cache == recompute
            for step in range(3):
                out = recompute_last_logits(model, x4, tokens4[:, :step])
                torch.testing.assert_close(out, step_logits[:, step], rtol=1e-5, atol=1e-5)
    with prunekit.attach(model, "flowcut", budget=8, batch_coupled=True) as h:
        model(**x4)
        coupled = h.trace.events[0].n_out
    assert len(set(coupled)) == 1 and coupled[0] == min(after1)  # the reference's batch max of P

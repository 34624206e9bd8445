"""FastV (docs/strategies/fastv.md): budget arithmetic, scores against eager attention, the `all` query, the mask variant."""
import pytest
import torch
from transformers import AutoModelForImageTextToText

import prunekit
from prunekit import Keep, PruneContext, Site, TokenPruner, build_strategy
from prunekit.budget import single_cut_keep
from prunekit.signals import AttentionRows, Signals
from helpers import batch, greedy
from prunekit.compat import LOAD_KWARGS

N, T = 64, 4  # the tiny model: 64 visual tokens, 4 decoder layers


@pytest.fixture(scope="module")
def eager_model(tiny_dir):
    return AutoModelForImageTextToText.from_pretrained(tiny_dir, **LOAD_KWARGS, attn_implementation="eager").eval()


# --- budgets ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cut, expected", [(2, (166.4, 98.1, 29.9)), (3, (152.3, 81.7, 11.0))])
def test_n_avg_keep_count_reproduces_the_spec(cut, expected):
    """FastV's n_avg arithmetic (docs/strategies/fastv.md): T = 32, N = 576, targets 192 / 128 / 64, before rounding."""
    assert [round(single_cut_keep(t, 576, cut, 32), 1) for t in (192, 128, 64)] == list(expected)


def test_keep_counts_by_hand():
    assert build_strategy("fastv", R=0.5).keep_count(576, 32) == 288
    assert build_strategy("fastv", R=0.75).keep_count(576, 32) == 144
    assert build_strategy("fastv", R=0.9).keep_count(576, 32) == 58  # round(57.6)
    assert build_strategy("fastv", keep_ratio=0.25).keep_count(576, 32) == 144  # the kept share, = 1 - R
    with pytest.warns(DeprecationWarning, match="R="):  # the old name still means the dropped share
        assert build_strategy("fastv", ratio=0.75).keep_count(576, 32) == 144
    assert build_strategy("fastv", budget=64).keep_count(576, 32) == 64  # n_final
    assert build_strategy("fastv", budget=64, convention="n_avg").keep_count(576, 32) == 30  # 29.87
    n_avg = build_strategy("fastv", budget=40, convention="n_avg")
    assert n_avg.keep_count(N, T) == 16  # (4·40 − 2·64) / 2
    assert build_strategy("fastv", budget=500, convention="n_avg").keep_count(N, T) == N  # clamped to N
    assert build_strategy("fastv", budget=33, convention="n_avg").keep_count(N, T) == 2  # (132 − 128) / 2
    assert build_strategy("fastv", budget=32, convention="n_avg").keep_count(N, T) == 1  # k = 0, clamped to 1
    with pytest.raises(ValueError, match="even keeping none after the cut averages 32. Reachable n_avg targets "
                                         "for 64 image tokens: 32..64"):
        build_strategy("fastv", budget=31, convention="n_avg").keep_count(N, T)


def test_bad_knobs_and_unreachable_budgets_fail_early(model):
    for knobs, match in ((dict(query="first"), "unknown fastv query"), (dict(variant="soft"), "unknown fastv variant"),
                         (dict(R=1.0), "R=1.0 keeps a share 0"), (dict(layer=0), "strategy=random"),
                         (dict(R=0.5, keep_ratio=0.5), "not both"),
                         (dict(budget=8, convention="n_in"), "n_final or n_avg")):
        with pytest.raises(ValueError, match=match):
            build_strategy("fastv", **knobs)
    with pytest.raises(ValueError, match="language model has 4 layers: choose 1 <= layer <= 3"):
        prunekit.attach(model, "fastv", layer=4)
    with pytest.raises(ValueError, match="Reachable n_avg targets"):  # at attach, before any forward
        prunekit.attach(model, "fastv", budget=16, convention="n_avg")


def test_ties_go_to_the_lower_index():
    class Flat:
        def attention(self, query, heads):
            return torch.tensor([[0.1, 0.3, 0.3, 0.3, 0.2, 0.0]])

    ctx = PruneContext(site=Site("llm_layer", 2), tokens=torch.zeros(1, 6, 1), lengths=torch.tensor([5]),
                       grids=[None], sample_of=[0], num_layers=T, signals=Flat())
    assert build_strategy("fastv", budget=3).prune(ctx).indices[0].tolist() == [1, 2, 3]
    assert build_strategy("fastv", budget=5).prune(ctx).indices[0].tolist() == [0, 1, 2, 3, 4]  # padding never


# --- scores: rows from q and k equal eager attention ------------------------------------------------

def image_columns(model, x):
    img = x["input_ids"] == model.config.image_token_id
    return [img[b].nonzero().squeeze(1) for b in range(img.shape[0])]


def top(scores, k):
    return torch.sort(scores, descending=True, stable=True).indices[:k].sort().values


@pytest.mark.parametrize("query", ["last", "all"])
def test_kept_tokens_are_the_top_k_of_layer_k_minus_1_eager_attention(model, eager_model, processor, query):
    x = batch(processor, [0, 1, 2, 3])  # left-padded
    attn = eager_model(**x, output_attentions=True).attentions[1]  # layer K-1 = 1, (B, H, L, L)
    live = x["attention_mask"].bool()
    with prunekit.attach(model, "fastv", budget=16, query=query) as h:
        model(**x)
        assert model.config.text_config._attn_implementation == "prunekit_sdpa"  # sdpa, wrapped; never eager
        assert all(rows.shape == (4, x["input_ids"].shape[1]) for rows in h.probe.rows.values())  # 1 x L rows
    assert model.config.text_config._attn_implementation == "sdpa"
    for b, cols in enumerate(image_columns(model, x)):
        probs = attn[b].mean(0)  # head mean (L, L)
        scores = probs[-1] if query == "last" else probs[live[b]].mean(0)
        assert torch.equal(h.trace.kept_positions(b), top(scores[cols], 16))


@pytest.mark.parametrize("chunk", [7, 4096])
def test_all_query_rows_equal_the_eager_mean_over_live_queries(model, eager_model, processor, monkeypatch, chunk):
    """The paper's φ(j) = 1/n Σ_i A(i, j) over the live (non-padding) queries, computed CHUNK_ROWS rows at a time."""
    monkeypatch.setattr("prunekit.runtime.probe.CHUNK_ROWS", chunk)
    rows = (AttentionRows("all", "mean"), AttentionRows("all", "all"))

    class Watch(TokenPruner):
        name = "watch_all"

        def sites(self):
            return [Site("llm_layer", 2)]

        def signals(self, site):
            return Signals(rows=rows)

        def prune(self, ctx):
            self.seen = [ctx.attention(r.query, r.heads) for r in rows]

    x = batch(processor, [0, 1, 2, 3])
    attn = eager_model(**x, output_attentions=True).attentions[1]
    watch = Watch()
    with prunekit.attach(model, watch):
        model(**x)
    live = x["attention_mask"].bool()
    for b, cols in enumerate(image_columns(model, x)):
        per_head = attn[b][:, live[b]].mean(1)[:, cols]  # (H, N)
        torch.testing.assert_close(watch.seen[1][b], per_head, rtol=0, atol=1e-6)
        torch.testing.assert_close(watch.seen[0][b], per_head.mean(0), rtol=0, atol=1e-6)


# --- accounting and the mask variant ----------------------------------------------------------------

def test_n_avg_budget_accounting_by_hand(model, processor):
    """N = 64, T = 4, K = 2, n_avg target 40 -> k = (4·40 − 2·64) / 2 = 16."""
    x = batch(processor, [0, 3])
    with prunekit.attach(model, "fastv", budget=40, convention="n_avg") as h:
        logits = model(**x).logits
    t = h.trace
    assert (t.n_in, t.n_final, t.n_avg) == ([64, 64], [16, 16], [40.0, 40.0])
    assert t.llm_layer_counts.tolist() == [[64, 64, 16, 16]] * 2 and t.budget.convention == "n_avg"
    assert logits.shape[1] == x["input_ids"].shape[1] - 48  # removed physically


def test_mask_variant_equals_inplace(model, processor):
    """FastV's README evaluation path: dropped image keys masked out of every later layer, all tokens still
    computed. With original positions kept, the outputs equal the inplace variant."""
    x = batch(processor, [0, 1, 2])
    runs = {}
    for variant in ("inplace", "mask"):
        with prunekit.attach(model, "fastv", budget=16, variant=variant) as h:
            logits = model(**x).logits
            tokens, step_logits = greedy(model, x, 4)
        runs[variant] = logits, tokens, step_logits, h.trace, h.strategy.params()
    (li, ti, si, trace_i, _), (lm, tm, sm, trace_m, params) = runs["inplace"], runs["mask"]
    assert lm.shape[1] == x["input_ids"].shape[1] and li.shape[1] == lm.shape[1] - 48  # nothing removed
    torch.testing.assert_close(lm[:, -1], li[:, -1], rtol=1e-5, atol=1e-5)
    assert torch.equal(tm, ti)
    torch.testing.assert_close(sm, si, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(trace_m.kept_positions(b), trace_i.kept_positions(b)) for b in range(3))
    assert trace_m.n_avg == trace_i.n_avg and "masked out, not removed" in trace_m.notes[0]
    assert params["variant"] == "mask" and params["removes_tokens"] is False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_runs_without_nan(tiny_dir, processor, dtype):
    half = AutoModelForImageTextToText.from_pretrained(tiny_dir, **LOAD_KWARGS, dtype=dtype).eval()
    x = batch(processor, [0, 1, 2])
    x["pixel_values"] = x["pixel_values"].to(dtype)
    for knobs in (dict(), dict(query="all"), dict(variant="mask")):
        with prunekit.attach(half, "fastv", budget=16, **knobs) as h:
            assert torch.isfinite(half(**x).logits).all(), knobs
            assert h.trace.n_final == [16] * 3
            assert all(rows.dtype == torch.float32 and torch.isfinite(rows).all() for rows in h.probe.rows.values())
            half.generate(**x, max_new_tokens=3, min_new_tokens=3, do_sample=False)


def test_mask_only_decisions_are_refused_before_the_llm(model, processor):
    class MaskVision(TokenPruner):
        name = "mask_vision"

        def sites(self):
            return [Site("vision_output")]

        def prune(self, ctx):
            return Keep([torch.arange(4)] * ctx.num_units, mask_only=True)

    with prunekit.attach(model, MaskVision()):
        with pytest.raises(prunekit.PruningError, match="mask_only decision at vision_output"):
            model(**batch(processor, [0]))

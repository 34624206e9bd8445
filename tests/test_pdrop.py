"""PyramidDrop (docs/strategies/pdrop.md): schedules and budgets, pre signals (block b on its input) against eager
attention, a hand-run language model, and compact positions at llm_layer sites in prefill and decode."""
import pytest
import torch
from transformers import AutoModelForImageTextToText

import prunekit
from prunekit import Site, TokenPruner, build_strategy
from prunekit.budget import schedule_average
from prunekit.signals import AttentionRows, Signals
from prunekit.strategies.pdrop import lambda_for_average, pyramid
from helpers import batch, generate_positions, ragged_keep
from prunekit.compat import LOAD_KWARGS

N, T = 64, 4  # the tiny model: 64 visual tokens, 4 decoder layers
LAYERS = [1, 2, 3]


@pytest.fixture(scope="module")
def eager_model(tiny_dir):
    return AutoModelForImageTextToText.from_pretrained(tiny_dir, **LOAD_KWARGS, attn_implementation="eager").eval()


# --- schedules and budgets --------------------------------------------------------------------------

def test_schedule_average_reproduces_the_spec():
    """docs/strategies/pdrop.md's schedules on LLaVA-1.5 (T = 32, N = 576, boundaries [8, 16, 24])."""
    assert pyramid(576, 0.5, 3) == [288, 144, 72]
    assert schedule_average(576, [8, 16, 24], [288, 144, 72], 32) == 270
    assert schedule_average(576, [8, 16, 24], pyramid(576, 0.25, 3), 32) == 191.25
    lam = lambda_for_average(192, 576, [8, 16, 24], 32)
    assert 0.25 < lam < 0.26  # 144·(1 + λ + λ² + λ³) = 192 at λ = 0.2537, up to int(): 146, 37, 9
    assert schedule_average(576, [8, 16, 24], pyramid(576, lam, 3), 32) == 192
    assert lambda_for_average(144, 576, [8, 16, 24], 32) < 1 / 576  # the minimum, λ -> 0
    for target in (128, 64):
        with pytest.raises(ValueError, match="at least 144 .*Reachable n_avg targets for 576 image tokens: 144..576"):
            lambda_for_average(target, 576, [8, 16, 24], 32)


@pytest.mark.parametrize("knobs, counts", [
    (dict(), [32, 16, 8]),  # λ = 0.5: n_avg (64 + 32 + 16 + 8) / 4 = 30
    (dict(lam=0.25), [16, 4, 1]),
    (dict(ratio_list=[0.5, 0.5, 0.1]), [32, 32, 6]),
    (dict(budget=30), [32, 16, 8]),  # n_avg 30 exactly at λ = 0.5
    (dict(budget=34), [37, 22, 13]),  # the largest λ with n_avg <= 34: (64 + 72) / 4 = 34
    (dict(budget=16), [0, 0, 0]),  # the minimum: layer 0 alone, 64 / 4
    (dict(budget=100), [64, 64, 64]),  # above N: keep all
    (dict(budget=16, convention="n_final"), [40, 25, 16]),  # λ = (16/64)^(1/3) = 0.63
])
def test_stage_counts_by_hand(knobs, counts):
    strategy = build_strategy("pdrop", layer_list=LAYERS, **knobs)
    assert strategy.stage_counts(N, T) == counts


def test_bad_knobs_and_unreachable_budgets_fail_early(model):
    with pytest.raises(ValueError, match="budget .* or a ratio_list, not both"):
        build_strategy("pdrop", budget=16, ratio_list=[0.5, 0.25, 0.125])
    with pytest.raises(ValueError, match="non-increasing"):
        build_strategy("pdrop", ratio_list=[0.25, 0.5, 0.125])
    with pytest.raises(ValueError, match=r"must be increasing boundaries in 1..3 \(the language model has 4 layers\)"):
        prunekit.attach(model, "pdrop", layer_list=[8, 16, 24])
    with pytest.raises(ValueError, match="ratio_list has 2 ratios for 3 boundaries"):
        prunekit.attach(model, "pdrop", ratio_list=[0.5, 0.25])
    with pytest.raises(ValueError, match="at least 16 .*Reachable n_avg targets for 64 image tokens: 16..64"):
        prunekit.attach(model, "pdrop", budget=15)  # at attach, before any forward
    with prunekit.attach(model, "pdrop") as h:  # default boundaries: T/4, T/2, 3T/4
        assert h.strategy.params()["layer_list"] == LAYERS
        assert model.config.text_config._attn_implementation == "sdpa"  # pre signals wrap nothing


# --- pre signals: block b's own q, k on its input ---------------------------------------------------

class PreWatch(TokenPruner):
    """Records pre rows at ``pre`` sites and ordinary (layer b-1) rows at ``post`` sites; keeps all, or a
    ragged random subset at ``cut``."""

    name = "pre_watch"
    position_policy = "compact"
    rows = (AttentionRows("last", "all"), AttentionRows("text", "mean"), AttentionRows("all", "mean"))

    def __init__(self, pre, post=(), cut=None):
        super().__init__()
        self.pre, self.post, self.cut, self.seen = list(pre), list(post), cut, {}

    def sites(self):
        return sorted(self.pre + self.post + ([self.cut] if self.cut else []), key=lambda s: s.layer)

    def signals(self, site):
        if site == self.cut:
            return None
        return Signals(rows=self.rows, keys=True, values=True, pre=site in self.pre)

    def prune(self, ctx):
        if ctx.site == self.cut:
            return ragged_keep(ctx)
        self.seen[ctx.site] = dict(rows={r: ctx.attention(r.query, r.heads) for r in self.rows}, keys=ctx.keys(),
                                   values=ctx.values(), text=ctx.text_queries(), lengths=ctx.lengths.clone())
        return None


def test_pre_rows_equal_the_eager_probabilities_of_block_b_itself(model, eager_model, processor):
    """At llm_layer[b] with pre=True the rows are block b's attention (not b-1's): eager attentions[b] at the
    last query, the text queries and the mean over live queries; keys after RoPE; values. Batch 4, left-padded."""
    x = batch(processor, [0, 1, 2, 3])
    attentions = eager_model(**x, output_attentions=True).attentions
    watch = PreWatch([Site("llm_layer", 0), Site("llm_layer", 2)])  # block 0 too: no layer before it needed
    with prunekit.attach(model, watch):
        model(**x)
    img = x["input_ids"] == model.config.image_token_id
    live = x["attention_mask"].bool()
    for layer in (0, 2):
        seen, attn = watch.seen[Site("llm_layer", layer)], attentions[layer]
        for b in range(4):
            cols = img[b].nonzero().squeeze(1)
            torch.testing.assert_close(seen["rows"][PreWatch.rows[0]][b], attn[b, :, -1, cols], rtol=0, atol=1e-6)
            text = (live[b] & (torch.arange(img.shape[1]) > cols.max())).nonzero().squeeze(1)
            n_text = int(seen["text"][b].sum())
            assert n_text == len(text)
            torch.testing.assert_close(seen["rows"][PreWatch.rows[1]][b, :n_text], attn[b].mean(0)[text][:, cols],
                                       rtol=0, atol=1e-6)
            torch.testing.assert_close(seen["rows"][PreWatch.rows[2]][b], attn[b].mean(0)[live[b]].mean(0)[cols],
                                       rtol=0, atol=1e-6)
    attn_module = model.model.language_model.layers[2].self_attn
    out = {}
    hooks = [getattr(attn_module, p).register_forward_hook(lambda m, a, o, p=p: out.__setitem__(p, o))
             for p in ("v_proj",)]
    try:
        model(**x)
    finally:
        for hk in hooks:
            hk.remove()
    v = out["v_proj"].view(4, img.shape[1], -1, attn_module.head_dim).transpose(1, 2)
    cols = torch.stack([img[b].nonzero().squeeze(1) for b in range(4)])
    seen = watch.seen[Site("llm_layer", 2)]
    torch.testing.assert_close(seen["values"], torch.stack([v[b][:, cols[b]] for b in range(4)]), rtol=0, atol=1e-6)
    assert seen["keys"].shape == seen["values"].shape


def test_pre_rows_after_a_ragged_compact_cut_equal_the_rows_of_the_block_as_it_runs(model, processor):
    """After a ragged cut with compact positions, block 2's pre rows (computed before it runs) equal the rows
    the ordinary probe records inside block 2 as it runs (read at llm_layer[3]): same RoPE, mask and keys."""
    x = batch(processor, [0, 1, 2, 3])
    watch = PreWatch(pre=[Site("llm_layer", 2)], post=[Site("llm_layer", 3)], cut=Site("llm_layer", 1))
    with prunekit.attach(model, watch) as h:
        model(**x)
    assert len(set(h.trace.n_final)) > 1, "the test needs ragged counts"
    pre, post = watch.seen[Site("llm_layer", 2)], watch.seen[Site("llm_layer", 3)]
    for key in ("keys", "values", "text"):
        torch.testing.assert_close(pre[key], post[key], rtol=0, atol=1e-6)
    for r in PreWatch.rows:
        torch.testing.assert_close(pre["rows"][r], post["rows"][r], rtol=0, atol=1e-6)


# --- end to end -------------------------------------------------------------------------------------

def hand_run(model, x, counts):
    """Last-position logits of PyramidDrop run by hand on one unpadded sample, eager attention for the scores:
    at each boundary b, block b's attention probabilities on its input (last query, head mean) rank the
    image tokens; the top ones stay, in order, and positions restart at 0..L'-1."""
    lm, seen = model.model.language_model, {}
    hook = lm.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("embeds", kw["inputs_embeds"]),
                                        with_kwargs=True)
    try:
        model(**x)
    finally:
        hook.remove()
    h, img = seen["embeds"], (x["input_ids"] == model.config.image_token_id)[0]
    span = img.nonzero().squeeze(1)
    alive = torch.arange(len(span))  # span indices of the surviving image tokens

    def causal(n):
        return torch.full((n, n), float("-inf")).triu(1)[None, None]

    for i, layer in enumerate(lm.layers):
        pos = torch.arange(h.shape[1])[None]
        if i in LAYERS:
            _, probs = layer.self_attn(layer.input_layernorm(h), position_embeddings=lm.rotary_emb(h, pos),
                                       attention_mask=causal(h.shape[1]))
            scores = probs[0, :, -1].mean(0)[img]
            best = torch.sort(scores, descending=True, stable=True).indices[: counts[LAYERS.index(i)]].sort().values
            keep = ~img
            keep[img.nonzero().squeeze(1)[best]] = True
            h, img, alive = h[:, keep], img[keep], alive[best]
            pos = torch.arange(h.shape[1])[None]
        h = layer(h, attention_mask=causal(h.shape[1]), position_embeddings=lm.rotary_emb(h, pos), position_ids=pos)
    return model.lm_head(lm.norm(h))[:, -1], alive


@pytest.mark.parametrize("knobs", [dict(), dict(budget=34)])
def test_pdrop_equals_a_hand_run_language_model(model, eager_model, processor, knobs):
    strategy = build_strategy("pdrop", **knobs)
    with prunekit.attach(model, strategy) as h:
        for i in (0, 1):
            x = batch(processor, [i])
            logits = model(**x).logits[:, -1]
            ref, alive = hand_run(eager_model, x, strategy.stage_counts(N, T))
            torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
            assert torch.equal(h.trace.kept_positions(0), alive)


def test_accounting_by_hand(model, processor):
    x = batch(processor, [0, 3])
    with prunekit.attach(model, "pdrop", budget=34) as h:  # the largest λ with n_avg <= 34: 64, 37, 22, 13
        logits = model(**x).logits
    t = h.trace
    assert t.llm_layer_counts.tolist() == [[64, 37, 22, 13]] * 2
    assert (t.n_in, t.n_final, t.n_avg, t.budget.convention) == ([64, 64], [13, 13], [34.0, 34.0], "n_avg")
    assert [ev.site for ev in t.events] == ["llm_layer[1]", "llm_layer[2]", "llm_layer[3]"]
    assert set(t.kept_after("llm_layer[3]", 0).tolist()) <= set(t.kept_after("llm_layer[1]", 0).tolist())
    assert logits.shape[1] == x["input_ids"].shape[1] - (64 - 13)
    with prunekit.attach(model, "pdrop", budget=16, convention="n_final") as h:
        model(**x)
    assert h.trace.n_final == [16, 16] and h.trace.n_avg == [(64 + 40 + 25 + 16) / 4] * 2


def test_compact_positions_at_every_stage_in_prefill_and_decode(model, processor):
    """Each stage renumbers the live tokens 0..L'-1 in prefill; a decode step's position at layer i is the
    original one minus the tokens dropped before layer i (32, 48, 56), with RoPE tables to match."""
    x = batch(processor, [0, 1])  # left-padded
    steps, seen = 3, []
    lm = model.model.language_model
    with prunekit.attach(model, "pdrop"):
        hooks = [layer.register_forward_pre_hook(  # after prunekit's hooks: sees the rewritten kwargs
            lambda m, a, kw, i=i: seen.append((i, a[0].shape[1], kw["position_ids"], kw["position_embeddings"],
                                               kw["attention_mask"])), with_kwargs=True)
            for i, layer in enumerate(lm.layers)]
        try:
            model.generate(**x, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        finally:
            for hk in hooks:
                hk.remove()
    dropped = [0, 32, 48, 56]
    prompt_live = x["attention_mask"].sum(1)
    original = generate_positions(x["attention_mask"])
    for call, (i, length, positions, (cos, sin), mask) in enumerate(seen):
        step = call // 4
        ref_cos, ref_sin = lm.rotary_emb(cos, positions)
        torch.testing.assert_close((cos, sin), (ref_cos, ref_sin), rtol=0, atol=0)
        if step == 0:
            assert length == x["input_ids"].shape[1] - dropped[i]
            for b in range(2):  # live slots: 0..L'-1 (the entry keeps transformers' own left-padded positions)
                n_live = int(prompt_live[b]) - dropped[i]
                expected = torch.arange(n_live) if i > 0 else original[b][-n_live:]
                assert torch.equal(positions.expand(2, -1)[b, -n_live:], expected)
        else:
            assert length == 1
            assert positions.expand(2, -1)[:, 0].tolist() == (prompt_live + step - 1 - dropped[i]).tolist()
            if i > 0:  # the mask covers this layer's shorter cache plus the generated tokens
                assert mask.shape[-1] == x["input_ids"].shape[1] - dropped[i] + step


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_runs_without_nan(tiny_dir, processor, dtype):
    half = AutoModelForImageTextToText.from_pretrained(tiny_dir, **LOAD_KWARGS, dtype=dtype).eval()
    x = batch(processor, [0, 1, 2])
    x["pixel_values"] = x["pixel_values"].to(dtype)
    with prunekit.attach(half, "pdrop") as h:
        assert torch.isfinite(half(**x).logits).all()
        assert h.trace.llm_layer_counts.tolist() == [[64, 32, 16, 8]] * 3
        for rows in h.probe.rows.values():  # fp32 distributions over all keys
            assert rows.dtype == torch.float32
            torch.testing.assert_close(rows.sum(-1), torch.ones(3), rtol=0, atol=1e-4)
        half.generate(**x, max_new_tokens=3, min_new_tokens=3, do_sample=False)


def test_pre_signals_exist_only_at_llm_layer_sites(model):
    class VisionPre(TokenPruner):
        name = "vision_pre"

        def sites(self):
            return [Site("vision_output")]

        def signals(self, site):
            return Signals(rows=(AttentionRows("first"),), pre=True)

        def prune(self, ctx):
            return None

    with pytest.raises(prunekit.PruningError, match="pre signals .* llm_layer sites only"):
        prunekit.attach(model, VisionPre())

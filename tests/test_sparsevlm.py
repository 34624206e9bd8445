"""SparseVLM (docs/strategies/sparsevlm.md): the reference's budget accounting (192.03 / 206.5), raters, scores against eager
attention (v1.5 head mean; v2 gravity and head selection), DPC-kNN recycling by hand and through the runtime
(merged tokens after the kept ones, compact positions), v1's rank rule, knobs and errors."""
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForImageTextToText

import prunekit
from prunekit import PromptEmbeddings, Site, Stage, TokenPruner, build_strategy
from prunekit.budget import layer_average, layer_average_out
from prunekit.signals import AttentionRows, Signals
from prunekit.tiny import build_tiny_llava
from prunekit.strategies.sparsevlm import choose_raters, dpc_knn, merge_clusters, simulate
from helpers import batch, prompt
from prunekit.compat import LOAD_KWARGS

N, T = 64, 4  # the tiny model: 64 visual tokens, 4 decoder layers; default pruning layers [0, 1, 2]


@pytest.fixture(scope="module")
def eager_model(tiny_dir):
    return AutoModelForImageTextToText.from_pretrained(tiny_dir, **LOAD_KWARGS, attn_implementation="eager").eval()


# --- budget accounting (docs/strategies/sparsevlm.md) -------------------------------------------------------------------------

@pytest.mark.parametrize("keeps, recycle, logger, inputs, final", [
    ([300, 200, 110], True, 192.03, 206.5, 113),  # v1.5 "192": the maintainers' log says 192.03125
    ([303, 110, 36], True, 128.6, 145.4, 39),
    ([66, 30, 17], True, 64.8, 82.3, 18),
    ([300, 200, 118], False, 192.4, 206.8, 118),  # v2
    ([238, 108, 60], False, 128.0, 144.1, 60),
    ([66, 34, 20], False, 64.4, 81.8, 20),
])
def test_schedules_reproduce_the_spec_accounting(keeps, recycle, logger, inputs, final):
    """576 tokens, 32 layers, pruning the outputs of layers 2, 6, 15; with recycling int(0.3·n_del)+1 tokens
    are clustered into int(n_rec/10)+1 merged ones (v1.5 "192": 576 → 300+9 → 200+4 → 110+3)."""
    counts = simulate(576, [2, 6, 15], keeps, 32, recycle)
    assert layer_average_out(counts) == pytest.approx(logger, abs=0.0501)  # the spec rounds half up: 82.25 -> 82.3
    assert layer_average(counts) == pytest.approx(inputs, abs=0.0501)
    assert counts[-1] == final
    if keeps == [300, 200, 110]:
        assert counts[:8] == [576, 576, 576, 309, 309, 309, 309, 204] and layer_average_out(counts) == 6145 / 32


def test_the_reference_model_logs_192_03_and_206_5():
    """A 32-layer LLaVA-1.5 shape with 576 visual tokens (tiny widths): the trace reports the logger and the
    input-count conventions of SparseVLM v1.5 "192" and v2 "192", and the tokens are physically removed."""
    model, processor = build_tiny_llava(image_size=336, text_layers=32)
    from prunekit.tiny import synthetic_image

    x = processor(images=[synthetic_image(1, 336)], text=[prompt(processor, "is there a red box?")], return_tensors="pt")
    with torch.no_grad():
        with prunekit.attach(model, "sparsevlm", budget=192) as h:
            logits = model(**x).logits
        t = h.trace
        assert [(ev.site, ev.n_in, ev.n_out) for ev in t.events] == [
            ("llm_layer[3]", [576], [309]), ("llm_layer[7]", [309], [204]), ("llm_layer[16]", [204], [113])]
        assert (t.n_avg_out, t.n_avg, t.n_final) == ([6145 / 32], [206.5], [113])
        assert t.summary()["n_avg_out"] == 192.03125 and t.budget.convention == "n_avg_out"
        assert logits.shape[1] == x["input_ids"].shape[1] - (576 - 113)
        with prunekit.attach(model, "sparsevlm", version="v2", budget=192) as h:
            model(**x)
        assert (h.trace.n_avg_out, h.trace.n_avg, h.trace.n_final) == ([192.4375], [206.75], [118])
        assert h.trace.position_policy == "original"


def test_other_budgets_and_models_derive_a_schedule_meeting_the_target(model, processor):
    """Outside the reference setting the nearest table row is scaled to the budget under its convention."""
    x = batch(processor, [0, 1])
    for knobs in (dict(budget=16), dict(budget=24, convention="n_avg"), dict(budget=8, convention="n_final"),
                  dict(version="v2", budget=16)):
        strategy = build_strategy("sparsevlm", **knobs)
        with prunekit.attach(model, strategy) as h:
            model(**x)
        t, target = h.trace, knobs["budget"]
        outs = [ev.n_out for ev in t.events]  # tokens after each of the three cuts, per sample
        assert [ev.site for ev in t.events] == ["llm_layer[1]", "llm_layer[2]", "llm_layer[3]"]
        for b in range(2):  # each layer takes what the last cut left, and every cut removes tokens
            assert t.llm_layer_counts[b].tolist() == [N] + [o[b] for o in outs]
            assert N > outs[0][b] > outs[1][b] > outs[2][b] > 0
        measured = {"n_avg_out": t.n_avg_out, "n_avg": t.n_avg, "n_final": t.n_final}[t.budget.convention][0]
        assert target - 2 <= measured <= target  # the largest scaled schedule not above the target
    assert build_strategy("sparsevlm", keep_list=[40, 20, 10]).schedule(N, T) == [40, 20, 10]


# --- raters and prompt embeddings ---------------------------------------------------------------------

def test_raters_by_hand():
    """V = e1, e2; T = e1, e2, 0: r = ((e+1)/2, (e+1)/2, 1) / (e+2), mean 1/3, so the first two rate."""
    emb = PromptEmbeddings(torch.eye(2)[None], torch.ones(1, 2, dtype=torch.bool),
                           torch.tensor([[[1.0, 0], [0, 1], [0, 0]]]), torch.ones(1, 3, dtype=torch.bool))
    assert choose_raters(emb)[0].tolist() == [True, True, False]
    one = PromptEmbeddings(torch.eye(2)[None], torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 1, 2),
                           torch.ones(1, 1, dtype=torch.bool))
    assert choose_raters(one, "gt")[0].tolist() == [True]  # r = mean(r): no rater under ">", so all rate
    assert choose_raters(one, "ge")[0].tolist() == [True]


class PromptWatch(TokenPruner):
    name, position_policy = "prompt_watch", "original"

    def __init__(self):
        super().__init__()
        self.seen = {}

    def sites(self):
        return [Site("llm_layer", 1)]

    def signals(self, site):
        return Signals(rows=(AttentionRows("text", "all"),), prompt=True)

    def prune(self, ctx):
        self.seen = dict(prompt=ctx.prompt_embeddings(), gravity=ctx.rope_gravity(), text=ctx.text_queries())
        return None


def test_prompt_embeddings_and_rope_gravity_are_what_the_language_model_sees(model, processor):
    """Batch 4, left-padded: the visual and text rows equal the LM's inputs_embeds; the gravity term equals
    Σ_i 2·cos((m − n)·θ_i) / √d_h between text query m and visual key n (the slot positions here)."""
    x = batch(processor, [0, 1, 2, 3])
    lm, captured = model.model.language_model, {}
    hook = lm.register_forward_pre_hook(lambda m, a, kw: captured.__setitem__("embeds", kw["inputs_embeds"]),
                                        with_kwargs=True)
    watch = PromptWatch()
    try:
        with prunekit.attach(model, watch):
            model(**x)
    finally:
        hook.remove()
    p, embeds = watch.seen["prompt"], captured["embeds"]
    img, live = x["input_ids"] == model.config.image_token_id, x["attention_mask"].bool()
    attn = lm.layers[0].self_attn
    for b in range(4):
        cols = img[b].nonzero().squeeze(1)
        text = (live[b] & (torch.arange(img.shape[1]) > cols.max())).nonzero().squeeze(1)
        assert torch.equal(p.image[b], embeds[b, cols]) and p.image_valid[b].all()
        n = len(text)
        assert torch.equal(p.text[b, :n], embeds[b, text]) and p.text_valid[b].sum() == n
        assert int(watch.seen["text"][b].sum()) == n
        delta = (text[:, None] - cols[None]).float()
        expected = 2 * torch.cos(delta[..., None] * lm.rotary_emb.inv_freq).sum(-1) * attn.head_dim**-0.5
        torch.testing.assert_close(watch.seen["gravity"][b, :n], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(p.image_valid, torch.ones(4, N, dtype=torch.bool))


# --- scores against eager attention -------------------------------------------------------------------

def hand_keep(eager_model, x, b, count, gravity=False, top_heads=None):
    """Sample b's kept image tokens at the first pruning layer (layer 0's output), by hand from eager attention."""
    lm, seen = eager_model.model.language_model, {}
    hook = lm.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("embeds", kw["inputs_embeds"]),
                                        with_kwargs=True)
    try:
        attn = eager_model(**x, output_attentions=True).attentions[0][b]  # (H, L, L)
    finally:
        hook.remove()
    img, live = (x["input_ids"] == eager_model.config.image_token_id)[b], x["attention_mask"][b].bool()
    cols = img.nonzero().squeeze(1)
    text = (live & (torch.arange(len(img)) > cols.max())).nonzero().squeeze(1)
    e = seen["embeds"][b].float()
    r = (e[cols] @ e[text].T).softmax(1).mean(0)
    raters = text[r > r.mean()]
    a = attn[:, raters][:, :, cols].float()  # (H, raters, N)
    if gravity:
        delta = (raters[:, None] - cols[None]).float()
        g = 2 * torch.cos(delta[..., None] * lm.rotary_emb.inv_freq).sum(-1) * lm.layers[0].self_attn.head_dim**-0.5
        a = a / g.abs().clamp(min=1e-6)
    if top_heads:
        a = a[a.sum((1, 2)).topk(top_heads).indices]
    p = a.mean(0).mean(0)
    return torch.sort(p, descending=True, stable=True).indices[:count].sort().values


@pytest.mark.parametrize("knobs", [dict(recycle=False), dict(version="v2", top_heads=2), dict(version="v2", top_heads=4)],
                         ids=["v1.5-mean-heads", "v2-gravity-top2", "v2-gravity-all-heads"])
def test_first_cut_equals_eager_attention_by_hand(model, eager_model, processor, knobs):
    x = batch(processor, [0, 1, 2, 3])
    strategy = build_strategy("sparsevlm", budget=16, **knobs)
    with prunekit.attach(model, strategy) as h:
        model(**x)
    count = strategy.schedule(N, T)[0]
    for b in range(4):
        expected = hand_keep(eager_model, x, b, count, gravity=strategy.gravity, top_heads=strategy.top_heads)
        assert torch.equal(h.trace.kept_after("llm_layer[1]", b), expected)


# --- recycling ----------------------------------------------------------------------------------------

def test_dpc_knn_by_hand():
    """Two groups on a line, 2 clusters. ρ = exp(−mean squared distance to the 2 nearest, itself included):
    0.005 for 0, 0.1, 0.2 and 0.045 for 10, 10.3; the noise (the reference's tie-breaker, given here) makes
    0.1 and 10.3 the densest of their groups. δ: 10.3 (the largest distance) for the global peak 0.1, 10.1 for
    10.3 (to 0.2), 0.1 or 0.3 for the rest; centres = top-2 ρ·δ = [0.1, 10.3]; every point joins its group."""
    x = torch.tensor([[0.0], [0.1], [0.2], [10.0], [10.3]])
    centres, assignment = dpc_knn(x, 2, torch.tensor([0, 2e-6, 1e-6, 0, 1e-6]))
    assert centres.tolist() == [1, 4]
    assert assignment.tolist() == [0, 0, 0, 1, 1]
    groups = {tuple((assignment == c).nonzero().squeeze(1).tolist()) for c in range(2)}
    assert groups == {(0, 1, 2), (3, 4)}
    merged = merge_clusters(x, assignment, 2)
    expected = {(0, 1, 2): 0.3 / (3 + 1e-6), (3, 4): 20.3 / (2 + 1e-6)}
    for c in range(2):
        members = tuple((assignment == c).nonzero().squeeze(1).tolist())
        assert merged[c, 0].item() == pytest.approx(expected[members], rel=1e-7)
    assert merge_clusters(x, assignment, 2, "sum").sum().item() == pytest.approx(20.6)
    # the paper assigns by cosine similarity, the code by distance: (0.3, 0.25) points along the far group at
    # (3, 0) but lies next to the near one at (0, 0.55)
    x = torch.tensor([[3.0, 0], [3.05, 0], [3.1, 0], [0, 0.5], [0, 0.55], [0.3, 0.25]])
    noise = torch.tensor([0, 2e-6, 0, 0, 1e-6, 0])
    assert dpc_knn(x, 2, noise)[1].tolist() == [0, 0, 0, 1, 1, 1]
    assert dpc_knn(x, 2, noise, assign="cosine")[1].tolist() == [0, 0, 0, 1, 1, 0]


def test_recycled_tokens_are_merged_outputs_placed_after_the_kept_ones(model, processor):
    """At llm_layer[1] (layer 0's output pruned): the visual slots hold the kept tokens in order, then each
    cluster's mean of layer-0 outputs; compact positions number them 0..L'-1; the trace lists the kept span
    indices, then the cluster centres, with the clusters as members."""
    x = batch(processor, [2])
    hidden = model(**x, output_hidden_states=True).hidden_states[1][0]  # layer 0's output, unpruned
    img = (x["input_ids"] == model.config.image_token_id)[0]
    start = int(img.nonzero()[0])
    lm, seen = model.model.language_model, {}
    strategy = build_strategy("sparsevlm", budget=16)
    with prunekit.attach(model, strategy) as h:
        hook = lm.layers[1].register_forward_pre_hook(
            lambda m, a, kw: seen.update(h=a[0][0], pos=kw["position_ids"][0]), with_kwargs=True)
        try:
            model(**x)
        finally:
            hook.remove()
    kept = strategy.schedule(N, T)[0]
    deleted = N - kept
    n_rec = int(0.3 * deleted) + 1
    clusters = n_rec // 10 + 1
    survivors, members = h.trace.kept_after("llm_layer[1]", 0), h.trace.events[0]
    assert members.n_out == [kept + clusters]
    visual = seen["h"][start : start + kept + clusters]
    assert torch.equal(survivors[:kept], survivors[:kept].sort().values)  # kept, in order, then the merged
    torch.testing.assert_close(visual[:kept], hidden[start + survivors[:kept]], rtol=0, atol=0)
    assert torch.equal(seen["pos"], torch.arange(len(seen["h"])))
    # members of the final tokens after three cuts are not needed here: rerun with one pruning layer
    with prunekit.attach(model, "sparsevlm", keep_list=[kept], layers=[0]) as h1:
        model(**x)
    groups = h1.trace.members(0)[kept:]
    reps = h1.trace.kept_positions(0)[kept:]
    assert len(groups) == clusters and sum(len(g) for g in groups) == n_rec
    assert all(int(r) in g.tolist() for r, g in zip(reps, groups))
    assert not set(torch.cat(groups).tolist()) & set(h1.trace.kept_positions(0)[:kept].tolist())
    for j, g in enumerate(groups):
        torch.testing.assert_close(visual[kept + j], hidden[start + g].mean(0), rtol=1e-5, atol=1e-5)


# --- v1: rank-adaptive counts -------------------------------------------------------------------------

def test_v1_counts_follow_the_rank_of_the_rater_rows():
    strategy = build_strategy("sparsevlm", version="v1", budget=192)  # scale 13.5, bias 0
    rows = torch.tensor([[1.0, 0, 0, 0, 1], [0, 1.0, 0, 0, 0], [1.0, 1.0, 0, 0, 1]])  # rank 2
    assert strategy.keep_count(0, 40, rows, 40, 32) == 27  # int(2 · 13.5)
    assert strategy.keep_count(0, 20, rows, 20, 32) == 19  # min(27, n - 1)
    assert strategy.keep_count(0, 2, torch.eye(2), 2, 32) is None  # rank = n: the layer is skipped
    assert build_strategy("sparsevlm", version="v1", budget=128).keep_count(0, 40, rows, 40, 32) == 24  # 2·9 + 6
    assert build_strategy("sparsevlm", version="v1", budget=192).params()["layers"] is None  # bound at attach


def test_v1_prunes_at_four_layers_and_may_skip(model, processor):
    with prunekit.attach(model, "sparsevlm", version="v1", scale=1.0, layers=[0, 1]) as h:
        model(**batch(processor, [0, 1]))
    t = h.trace
    assert [ev.site for ev in t.events] == ["llm_layer[1]", "llm_layer[2]"]
    assert all(0 < n < N for n in t.events[0].n_out)
    v1 = build_strategy("sparsevlm", version="v1")
    v1.bind(SimpleNamespace(num_llm_layers=32, tokens_per_image=lambda: 576))  # LLaVA-1.5-7B's depth
    assert v1.sites() == [Site(Stage.LLM_LAYER, k) for k in (3, 7, 16, 20)]  # outputs of layers 2, 6, 15, 19


# --- knobs and errors ---------------------------------------------------------------------------------

def test_bad_knobs_fail_with_the_fix(model):
    with pytest.raises(ValueError, match="unknown sparsevlm version 'v3'"):
        build_strategy("sparsevlm", version="v3")
    with pytest.raises(ValueError, match=r"scale/bias for budgets \[64, 128, 192\]: pick one or set scale="):
        build_strategy("sparsevlm", version="v1", budget=100)
    with pytest.raises(ValueError, match="keep_list is a v1.5 / v2 knob"):
        build_strategy("sparsevlm", version="v1", keep_list=[1, 2, 3])
    with pytest.raises(ValueError, match="scale / bias are v1 knobs"):
        build_strategy("sparsevlm", scale=2.0)
    with pytest.raises(ValueError, match="convention n_avg_out | n_avg | n_final"):
        build_strategy("sparsevlm", convention="n_in")
    with pytest.raises(ValueError, match=r"layers \[2, 6, 15\] must be increasing in 0..2"):
        prunekit.attach(model, "sparsevlm", layers=[2, 6, 15])
    with pytest.raises(ValueError, match="keep_list has 2 counts for 3 pruning layers"):
        prunekit.attach(model, "sparsevlm", keep_list=[10, 5])
    with pytest.raises(ValueError, match="cannot reach 10 visual tokens .n_avg. with 64 image tokens"):
        prunekit.attach(model, "sparsevlm", budget=10, convention="n_avg")  # layer 0 and 1 alone average 32


def test_defaults_and_params(model):
    with prunekit.attach(model, "sparsevlm") as h:  # budget 192 > 64: keeps n-1, recycles 1 (the reference min)
        p = h.strategy.params()
    assert p["layers"] == [0, 1, 2] and p["position_policy"] == "compact" and p["recycle"]
    v2 = build_strategy("sparsevlm", version="v2").params()
    assert (v2["gravity"], v2["top_heads"], v2["recycle"], v2["position_policy"]) == (True, 14, False, "original")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_runs_without_nan(tiny_dir, processor, dtype):
    half = AutoModelForImageTextToText.from_pretrained(tiny_dir, **LOAD_KWARGS, dtype=dtype).eval()
    x = batch(processor, [0, 1, 2])
    x["pixel_values"] = x["pixel_values"].to(dtype)
    for version in ("v1.5", "v2"):
        with prunekit.attach(half, "sparsevlm", version=version, budget=16) as h:
            out = half.generate(**x, max_new_tokens=3, do_sample=False)
            assert torch.isfinite(half(**x).logits).all() and out.shape[0] == 3
            assert h.trace.n_avg_out == [16.0] * 3

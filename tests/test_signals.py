"""Attention rows from q and k (no eager, no N x N map) equal eager attention probabilities."""
import pytest
import torch
from transformers import AutoModelForImageTextToText

import prunekit
from prunekit import Keep, Site, Stage, TokenPruner
from prunekit.pruner import TokenType
from prunekit.runtime.probe import AttentionProbe
from prunekit.signals import AttentionRows, SignalError, Signals
from helpers import LLM_ROWS, ROWS, Recorder, batch
from prunekit.compat import LOAD_KWARGS

pytestmark = pytest.mark.contract  # the runtime contract: CI runs it on every transformers minor


@pytest.fixture(scope="module")
def eager_model(tiny_dir):
    return AutoModelForImageTextToText.from_pretrained(tiny_dir, **LOAD_KWARGS, attn_implementation="eager").eval()


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
    half = AutoModelForImageTextToText.from_pretrained(tiny_dir, **LOAD_KWARGS, dtype=dtype).eval()
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


# --- signals as strategies see them (PruneContext) ------------------------------------------------
def projections(model, layer_attn, x):
    """Keys and values (B, Hkv, L, d) a layer computes, recorded by hooks on its projections (no RoPE)."""
    out = {}
    hooks = [getattr(layer_attn, p).register_forward_hook(lambda m, a, o, p=p: out.__setitem__(p, o))
             for p in ("k_proj", "v_proj")]
    try:
        model(**x)
    finally:
        for h in hooks:
            h.remove()
    d = layer_attn.head_dim
    return {p: o.view(*o.shape[:2], -1, d).transpose(1, 2) for p, o in out.items()}


def rope_by_hand(k, config):
    """Llama RoPE at positions 0..L-1 (a forward without position ids): k cos + rotate_half(k) sin, with
    inv_freq_i = theta^(-2i/d), d the head dim."""
    d = k.shape[-1]
    theta = config.rope_parameters["rope_theta"] if getattr(config, "rope_parameters", None) else config.rope_theta
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(k.shape[2], dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([angles, angles], -1).cos().float(), torch.cat([angles, angles], -1).sin().float()
    rotated = torch.cat([-k[..., d // 2:], k[..., : d // 2]], -1)
    return k * cos + rotated * sin


def test_context_signals_equal_eager_attention_at_every_stage(model, eager_model, processor):
    x = batch(processor, [0, 1, 2, 3])
    eager = eager_model(**x, output_attentions=True)
    ref_vis = eager_model.model.vision_tower(x["pixel_values"], output_attentions=True).attentions
    lm_attn = eager.attentions[1]  # layer 1 scores the cut before layer 2
    sites = [Site("vision_layer", 1), Site("vision_output"), Site("llm_layer", 2)]
    recorder = Recorder(sites)
    with prunekit.attach(model, recorder):
        model(**x)
        assert model.config.vision_config._attn_implementation == "prunekit_sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    for site, layer in ((sites[0], 1), (sites[1], 4)):  # vision_output scores at the feature layer (4)
        seen = recorder.seen[site]
        torch.testing.assert_close(seen["rows"][ROWS[0]], ref_vis[layer][:, :, 0, 1:], rtol=0, atol=1e-6)
        mean = seen["rows"][ROWS[1]]
        assert mean.shape == (4, 64) and bool((mean.sum(-1) < 1).all())  # CLS takes the rest
    vis_v = projections(model, model.model.vision_tower.encoder.layers[1].self_attn, x)["v_proj"]
    torch.testing.assert_close(recorder.seen[sites[0]]["values"], vis_v[:, :, 1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(recorder.seen[sites[0]]["cls_value"], vis_v[:, :, 0], rtol=0, atol=1e-6)

    seen = recorder.seen[sites[2]]
    img = x["input_ids"] == model.config.image_token_id
    for b in range(4):
        cols = img[b].nonzero().squeeze(1)
        torch.testing.assert_close(seen["rows"][LLM_ROWS[0]][b], lm_attn[b, :, -1, cols], rtol=0, atol=1e-6)
        types = seen["types"][b]
        assert torch.equal(types == TokenType.IMAGE, img[b])
        assert torch.equal(types == TokenType.PAD, x["attention_mask"][b] == 0)
        text = (types == TokenType.TEXT).nonzero().squeeze(1)
        assert int(text.min()) > int(cols.max())  # the instruction follows the image
        rows = seen["rows"][LLM_ROWS[1]][b]
        n_text = int(seen["text"][b].sum())
        assert n_text == len(text)
        ref = lm_attn[b][:, text][:, :, cols].mean(0)
        torch.testing.assert_close(rows[:n_text], ref, rtol=0, atol=1e-6)
        assert (rows[n_text:] == 0).all()
    lm = projections(model, model.model.language_model.layers[1].self_attn, x)
    cols = torch.stack([img[b].nonzero().squeeze(1) for b in range(4)])
    torch.testing.assert_close(seen["values"], torch.stack([lm["v_proj"][b][:, cols[b]] for b in range(4)]),
                               rtol=0, atol=1e-6)
    keys = rope_by_hand(lm["k_proj"], model.config.text_config)  # keys are taken after RoPE
    torch.testing.assert_close(seen["keys"], torch.stack([keys[b][:, cols[b]] for b in range(4)]), rtol=0, atol=1e-5)


def test_signals_after_ragged_encoder_pruning_equal_batch_of_one(model, processor):
    """Live-token masks keep rows (and the mean query) of a padded image identical to running it alone."""
    def run(indices):
        recorder = Recorder([Site("vision_layer", 1)], cut=Site("vision_layer", 0))
        with prunekit.attach(model, recorder):
            model(**batch(processor, indices))
        return recorder.seen[Site("vision_layer", 1)]

    four = run([0, 1, 2, 3])
    assert len(set(four["lengths"].tolist())) > 1, "the test needs ragged counts"
    for b in range(4):
        one, n = run([b]), int(four["lengths"][b])
        for r in ROWS:
            torch.testing.assert_close(four["rows"][r][b, ..., :n], one["rows"][r][0, ..., :n], rtol=0, atol=1e-6)
            assert (four["rows"][r][b, ..., n:] == 0).all()
        torch.testing.assert_close(four["values"][b, :, :n], one["values"][0, :, :n], rtol=0, atol=1e-6)


def test_undeclared_signals_and_signals_at_llm_layer_0_are_refused(model, processor):
    class Greedy(TokenPruner):
        name = "greedy"

        def __init__(self, site, signals=None):
            super().__init__()
            self.site, self._signals = site, signals

        def sites(self):
            return [self.site]

        def signals(self, site):
            return self._signals

        def prune(self, ctx):
            ctx.attention("last")

    with prunekit.attach(model, Greedy(Site("llm_layer", 2))):
        with pytest.raises(RuntimeError, match="declare them in the strategy's signals"):
            model(**batch(processor, [0]))
    with prunekit.attach(model, Greedy(Site("llm_layer", 2), Signals(rows=(AttentionRows("first"),)))):
        with pytest.raises(SignalError, match="was not recorded at llm_layer\\[2\\]"):
            model(**batch(processor, [0]))
    with pytest.raises(prunekit.PruningError, match="llm_layer\\[0\\].*none"):
        prunekit.attach(model, Greedy(Site("llm_layer", 0), Signals(rows=(AttentionRows("last"),))))


def test_mean_hidden_rows_equal_a_global_token_run_by_hand(model, processor):
    """The mean_hidden query: the mean residual state entering the layer, normed and projected as the
    layer does, attending over all of the layer's tokens (FlowCut paper §3.1's global token)."""
    which = AttentionRows("mean_hidden", "mean")

    class Global(TokenPruner):
        name = "global_token"

        def sites(self):
            return [Site("vision_layer", 1)]

        def signals(self, site):
            return Signals(rows=(which,), values=True)

        def prune(self, ctx):
            self.rows, self.value = ctx.attention("mean_hidden"), ctx.query_values("mean_hidden")

    x = batch(processor, [0, 1])
    layer = model.model.vision_tower.encoder.layers[1]
    seen = {}
    hook = layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    strategy = Global()
    try:
        with prunekit.attach(model, strategy):
            model(**x)
    finally:
        hook.remove()
    attn, hidden = layer.self_attn, seen["x"]
    d = attn.head_dim
    split = lambda t: t.view(t.shape[0], t.shape[1], -1, d).transpose(1, 2)  # noqa: E731
    token = layer.layer_norm1(hidden.mean(1, keepdim=True))
    q, v = split(attn.q_proj(token)), split(attn.v_proj(token))
    k = split(attn.k_proj(layer.layer_norm1(hidden)))
    probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1).mean(1)[:, 0]  # (B, 65)
    torch.testing.assert_close(strategy.rows, probs[:, 1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(strategy.value, v[:, :, 0], rtol=0, atol=1e-6)
    with pytest.raises(SignalError, match="only in a vision tower"):
        AttentionProbe().watch(model.model.language_model.layers[1].self_attn, which)


def test_grid_positions_follow_the_survivors_at_vision_and_llm_sites(model, processor):
    """(image, row, col) of each current token: the 8x8 raster position of its representative."""
    class Watch(TokenPruner):
        name = "grid_watch"

        def __init__(self):
            super().__init__()
            self.seen = {}

        def sites(self):
            return [Site("vision_layer", 0), Site("vision_layer", 1), Site("llm_layer", 2)]

        def prune(self, ctx):
            if ctx.layer == 0:  # every other token
                return Keep([torch.arange(0, int(n), 2) for n in ctx.lengths])
            self.seen[ctx.stage] = [ctx.grid_positions(u) for u in range(ctx.num_units)]
            return None

    watch = Watch()
    with prunekit.attach(model, watch) as h:
        model(**batch(processor, [0, 1]))
    kept = torch.arange(0, 64, 2)
    expected = torch.stack([torch.zeros_like(kept), kept // 8, kept % 8], 1)
    for stage in (Stage.VISION_LAYER, Stage.LLM_LAYER):
        assert [torch.equal(g, expected) for g in watch.seen[stage]] == [True, True]
    assert torch.equal(h.trace.kept_positions(1), kept)

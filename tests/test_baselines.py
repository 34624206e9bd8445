"""VisionZip, FasterVLM, DivPrune and DART (docs/strategies/visionzip.md, fastervlm.md, divprune.md, dart.md): hand-worked small cases, the scores
against eager attention, and VisionZip end to end against a hand-run reduced input."""
import pytest
import torch
from transformers import AutoModelForImageTextToText

import prunekit
from prunekit import build_strategy
from prunekit.strategies.dart import DART
from prunekit.strategies.divprune import max_min_diverse
from prunekit.strategies.visionzip import contextual_groups, merge
from helpers import batch, generate_positions
from prunekit.compat import LOAD_KWARGS

N, B = 64, 16


@pytest.fixture(scope="module")
def eager_model(tiny_dir):
    return AutoModelForImageTextToText.from_pretrained(tiny_dir, **LOAD_KWARGS, attn_implementation="eager").eval()


def cls_attention(eager_model, pixel_values):
    """Head-mean [CLS] row of the vision feature layer's eager attention, at the patches: (images, N)."""
    tower = eager_model.model.vision_tower
    attn = tower(pixel_values, output_attentions=True).attentions[len(tower.encoder.layers) - 2]
    return attn[:, :, 0, 1:].mean(1)


# --- fastervlm --------------------------------------------------------------------------------------

def test_fastervlm_keeps_the_patches_cls_attends_to_most(model, eager_model, processor):
    x = batch(processor, [0, 1, 2, 3])
    with prunekit.attach(model, "fastervlm", budget=B) as h:
        model(**x)
    scores = cls_attention(eager_model, x["pixel_values"])
    for b in range(4):
        expected = torch.sort(scores[b], descending=True, stable=True).indices[:B].sort().values
        assert torch.equal(h.trace.kept_positions(b), expected)
    assert h.trace.n_in == [B] * 4 and h.strategy.params()["convention"] == "n_in"


# --- divprune ---------------------------------------------------------------------------------------

def test_divprune_greedy_max_min_by_hand():
    """d = (−1, 0) is farthest from its nearest neighbour (distance 1): first. Then a = (1, 0) at distance 2
    from d, then c = (0, 1) (min distance 1 to {d, a}) over b = (0.9, 0.1) (0.006 from a)."""
    x = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [-1.0, 0]])
    assert max_min_diverse(x, 3).tolist() == [3, 0, 2]
    assert max_min_diverse(x, 4).tolist() == [3, 0, 2, 1]
    assert max_min_diverse(x[:1], 1).tolist() == [0]


def test_divprune_budget_or_ratio(model, processor):
    x = batch(processor, [0])
    with prunekit.attach(model, "divprune") as h:  # the reference's SUBSET_RATIO 0.098: round(6.27) = 6 of 64
        model(**x)
    assert h.trace.n_in == [6]
    with pytest.raises(ValueError, match="keep_ratio=0.0 keeps a share 0 .* must be in \\(0, 1\\]"):
        build_strategy("divprune", keep_ratio=0.0)
    with pytest.warns(DeprecationWarning, match="keep_ratio"):  # the old name, the same share kept
        assert build_strategy("divprune", ratio=0.25).keep_ratio == 0.25


# --- dart -------------------------------------------------------------------------------------------

def test_dart_select_by_hand():
    """2 image pivots by key norm (tokens 0 and 1), 1 text pivot; each pivot takes the candidates least
    cosine-similar to it, without replacement."""
    dart = DART(budget=5, pivots_image=2, pivots_text=1)
    norms = torch.tensor([9.0, 8.0, 1.0, 1.0, 1.0, 1.0])
    hidden = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0.1], [-1.0, 0], [0.1, 1.0], [0, -1.0]])
    text_norms, text = torch.tensor([2.0, 5.0]), torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    # budget 5 - 2 pivots = 3 picks over 3 pivots: pivot 0 (1, 0) takes 3 (cos −1); pivot 1 (0, 1) takes 5;
    # text pivot 1 (1, −1) takes the least similar of {2, 4}: 4 (cos −0.64) over 2 (0.64)
    assert dart.select(norms, hidden, text_norms, text).tolist() == [0, 1, 3, 4, 5]
    assert DART(budget=5, pivots_image=2, pivots_text=1, parity_count=True).quotas(3, 3) == [1, 1, 1]
    assert DART(budget=128).quotas(8, 124) == [16, 16, 16, 16, 15, 15, 15, 15]
    assert DART(budget=128, parity_count=True).quotas(8, 124) == [16] * 8  # 4 + 8·16 = 132 kept


def test_dart_counts_and_its_signals(model, processor):
    """The keys DART ranks are layer K−1's after RoPE (text rows too), its similarity space the final norm."""
    x = batch(processor, [0, 1])
    seen = {}

    class Watch(DART):
        name = "dart_watch"

        def prune(self, ctx):
            text, valid = ctx.text_tokens()
            seen.update(keys=ctx.keys(), text_keys=ctx.text_keys(), text=text, valid=valid, tokens=ctx.tokens,
                        normed=ctx.output_norm(ctx.tokens))
            return super().prune(ctx)

    lm = model.model.language_model
    captured = {}
    hook = lm.layers[1].register_forward_hook(lambda m, a, o: captured.__setitem__("out", o[0] if isinstance(o, tuple) else o))
    try:
        with prunekit.attach(model, Watch(budget=B)) as h:
            model(**x, position_ids=generate_positions(x["attention_mask"]))
    finally:
        hook.remove()
    assert h.trace.n_final == [B, B]
    attn = lm.layers[1].self_attn
    img = x["input_ids"] == model.config.image_token_id
    live = x["attention_mask"].bool()
    pos = generate_positions(x["attention_mask"])
    hidden_in = model(**x, position_ids=pos, output_hidden_states=True).hidden_states[1]  # layer 1's input
    k = attn.k_proj(lm.layers[1].input_layernorm(hidden_in)).view(2, img.shape[1], -1, attn.head_dim).transpose(1, 2)
    cos, sin = lm.rotary_emb(k, pos)
    k = k * cos[:, None] + torch.cat([-k[..., attn.head_dim // 2:], k[..., : attn.head_dim // 2]], -1) * sin[:, None]
    for b in range(2):
        cols = img[b].nonzero().squeeze(1)
        text = (live[b] & (torch.arange(img.shape[1]) > cols.max())).nonzero().squeeze(1)
        r = len(text)
        torch.testing.assert_close(seen["keys"][b], k[b][:, cols], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seen["text_keys"][b, :, :r], k[b][:, text], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seen["text"][b, :r], captured["out"][b, text], rtol=0, atol=0)
        assert int(seen["valid"][b].sum()) == r
        torch.testing.assert_close(seen["normed"][b], lm.norm(seen["tokens"][b]), rtol=0, atol=0)
    with prunekit.attach(model, "dart", budget=B, parity_count=True) as h:  # the reference's 4 + 8·(16 // 8)
        model(**x)
    assert h.trace.n_final == [20, 20]
    with pytest.raises(ValueError, match="keeps its 4 image pivots"):
        build_strategy("dart", budget=2)


# --- visionzip --------------------------------------------------------------------------------------

def test_visionzip_splits_follow_the_reference():
    for budget, (d, c) in {64: (54, 10), 128: (108, 20), 192: (162, 30)}.items():  # VisionZip's scripts
        params = build_strategy("visionzip", budget=budget).params()
        assert (params["dominant"], params["contextual"]) == (d, c)
    assert build_strategy("visionzip", budget=16).params()["contextual"] == 2  # the reference's ~16% elsewhere
    with pytest.raises(ValueError, match="dominant \\+ contextual = budget"):
        build_strategy("visionzip", budget=16, dominant=10, contextual=10)


def test_contextual_merge_on_a_4x4_grid_by_hand():
    """No dominant tokens, 4 contextual on a 4×4 grid whose keys say the row: targets are every 4th token
    (0, 4, 8, 12: one per row), and every token joins its row's target."""
    metric = torch.nn.functional.one_hot(torch.arange(16) // 4, 4).float()
    targets, groups = contextual_groups(torch.arange(16), metric, 4)
    assert targets.tolist() == [0, 4, 8, 12]
    assert [g.tolist() for g in groups] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    # with dominant tokens 5 and 10 gone, R has 14 tokens: step 14 // 4 = 3, targets R[0], R[3], R[6], R[9]
    rest = torch.tensor([i for i in range(16) if i not in (5, 10)])
    targets, groups = contextual_groups(rest, metric, 4)
    # row 3 has no target and row 0 two: their tokens tie, and argmax takes the first target (0)
    assert targets.tolist() == [0, 3, 7, 11]
    assert [g.tolist() for g in groups] == [[0, 1, 2, 12, 13, 14, 15], [3], [4, 6, 7], [8, 9, 11]]
    h, members = torch.tensor([1.0, 1.0]), torch.tensor([[3.0, 1.0], [5.0, 1.0]])
    assert merge(h, members, "target_plus_mean").tolist() == [5.0, 2.0]  # H[t] + mean: not a convex average
    assert merge(h, members, "mean").tolist() == [3.0, 1.0]
    assert merge(h, members[:0], "target_plus_mean").tolist() == [1.0, 1.0]


def hand_visionzip(model, eager_model, x, dominant, contextual):
    """VisionZip by hand on the unpatched tiny model: (images, d + c, D) projector inputs in sequence order."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    fl = len(layers) - 2
    hs = tower(x["pixel_values"], output_hidden_states=True).hidden_states
    H = hs[fl + 1]  # the feature layer's output (hidden_states[-2]), [CLS] first
    attn = layers[fl].self_attn
    keys = attn.k_proj(layers[fl].layer_norm1(hs[fl])).view(*H.shape[:2], -1, attn.head_dim).mean(2)
    metric = torch.nn.functional.normalize(keys, dim=-1)
    scores = cls_attention(eager_model, x["pixel_values"])
    out = []
    for i in range(H.shape[0]):
        top = torch.sort(scores[i], descending=True, stable=True).indices[: dominant - 1].sort().values + 1
        rest = torch.tensor([j for j in range(1, N + 1) if j not in top.tolist()])
        step = len(rest) // contextual
        targets = rest[::step][:contextual]
        others = torch.tensor([j for j in rest.tolist() if j not in targets.tolist()])
        join = (metric[i, others] @ metric[i, targets].T).argmax(1)
        ctx = [H[i, t] + H[i, others[join == j]].mean(0) for j, t in enumerate(targets.tolist())]
        out.append(torch.cat([H[i, :1], H[i, top], torch.stack(ctx)]))
    return torch.stack(out)


def test_visionzip_equals_a_hand_run_reduced_input(model, eager_model, processor):
    """Logits equal the unpatched language model fed [CLS, dominant patches, contextual tokens] (projected,
    in that order, compact positions); the trace shows the contextual members and a member-less [CLS]."""
    x = batch(processor, [0, 3])  # left-padded: the pads keep their slots, as in the pruned run
    with prunekit.attach(model, "visionzip", budget=B) as h:
        logits = model(**x).logits
    d, c = 14, 2
    feats = model.model.multi_modal_projector(hand_visionzip(model, eager_model, x, d, c))
    lm, ids = model.model.language_model, x["input_ids"]
    img = ids == model.config.image_token_id
    rows, masks = [], []
    for b in range(2):
        slots = img[b].nonzero().squeeze(1)
        embeds, m = lm.embed_tokens(ids[b]), x["attention_mask"][b]
        rows.append(torch.cat([embeds[: slots[0]], feats[b], embeds[slots[-1] + 1 :]]))
        masks.append(torch.cat([m[: slots[0]], torch.ones(len(feats[b]), dtype=m.dtype), m[slots[-1] + 1 :]]))
    mask = torch.stack(masks)
    out = lm(inputs_embeds=torch.stack(rows), attention_mask=mask, position_ids=torch.arange(mask.shape[1])[None])
    torch.testing.assert_close(logits, model.lm_head(out.last_hidden_state), rtol=1e-5, atol=1e-5)
    t = h.trace
    assert t.n_in == [B, B]
    for b in range(2):
        members = t.members(b)
        assert len(members[0]) == 0  # [CLS] stands for no patch
        assert all(len(m) == 1 for m in members[1:d])
        assert sum(len(m) for m in members[d:]) == N - (d - 1)  # every non-dominant patch is in a contextual token
        kept = t.kept_positions(b)
        assert torch.equal(kept[1:d], kept[1:d].sort().values)  # dominant patches in order, after [CLS]
        assert all(int(k) in m.tolist() for k, m in zip(kept[d:], members[d:]))  # targets represent their group


def test_visionzip_and_fastervlm_need_a_cls_token(model):
    class NoCls:
        vision_prefix_tokens = 0

    for name in ("visionzip", "fastervlm"):
        assert "no [CLS] token" in build_strategy(name).supports(NoCls())

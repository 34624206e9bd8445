"""InternVL (-hf layout): tiles as vision units, the pixel shuffle's 2x2 patch groups (kept whole inside the ViT and
put back into each tile's grid before the shuffle; summed / averaged for signals at the projector), the tiles of each
image read off the prompt. (The runtime invariants on InternVL: tests/test_families_invariants.py.)"""
import pytest
import torch

import prunekit
from prunekit.adapters import adapter_for
from prunekit.errors import PruningError, UnsupportedModelError
from prunekit.tiny import build_tiny_internvl, synthetic_image
from helpers import generate_positions

pytestmark = pytest.mark.contract


@pytest.fixture(scope="module")
def internvl():
    model, processor = build_tiny_internvl()
    processor.tokenizer.padding_side = "left"
    return model, processor


def inputs(processor, sizes_per_sample, first: int = 0):
    """One prompt per sample with as many image items as it has images; sample i's pictures are seeded by
    ``first + i``, so a sample alone gets the pictures it has in a batch."""
    texts, images = [], []
    for i, sizes in enumerate(sizes_per_sample, first):
        content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": "what is it?"}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        images += [synthetic_image(10 * i + j, size) for j, size in enumerate(sizes)]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def test_pixel_shuffle_groups_are_2x2_patch_blocks(internvl):
    """Worked by hand from pixel_shuffle's view/permute steps on an 8x8 patch grid: token (r, c) of the 4x4 output
    holds patches (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1), in that channel order."""
    groups = adapter_for(internvl[0]).feature_groups(16)
    assert groups.shape == (16, 4)
    assert groups[0].tolist() == [0, 1, 8, 9]
    assert groups[1].tolist() == [2, 3, 10, 11]
    assert groups[4].tolist() == [16, 17, 24, 25]
    assert groups[15].tolist() == [54, 55, 62, 63]
    assert sorted(groups.flatten().tolist()) == list(range(64))


def test_tiles_of_each_image_are_read_off_the_prompt(internvl):
    """Two samples, the first with two images (one tile; 2 + thumbnail), the second with one (4 + thumbnail): the
    layouts follow the placeholder runs, and the trace counts 16 tokens a tile."""
    model, processor = internvl
    x = inputs(processor, [[(112, 112), (224, 112)], [(224, 224)]])
    assert x["pixel_values"].shape[0] == 1 + 3 + 5
    with torch.no_grad(), prunekit.attach(model, "keep_all") as h:
        model(**x)
    assert h.trace.vision_units == [4, 5]
    assert h.trace.n_vanilla == [16 + 48, 80]
    assert h.trace.merge_size == 4


def test_placeholders_that_are_not_whole_tiles_are_refused(internvl):
    """Two one-tile images whose runs are 17 and 15 placeholders: the model's own count check passes (32 = 2 tiles),
    but which tiles belong to which image is ambiguous, so prunekit refuses."""
    model, processor = internvl
    x = inputs(processor, [[(112, 112), (112, 112)]])
    ids, image = x["input_ids"].clone(), processor.image_token_id
    where = (ids[0] == image).nonzero().squeeze(1)
    ids[0, where[15] + 1] = image  # the first run's </img> becomes a placeholder
    ids[0, where[16]] = processor.tokenizer.convert_tokens_to_ids("a")  # and the second run loses one
    with prunekit.attach(model, "random", budget=4), pytest.raises(PruningError, match="whole number"):
        model(input_ids=ids, attention_mask=x["attention_mask"], pixel_values=x["pixel_values"])


def test_a_vit_cut_equals_the_tower_run_by_hand_on_the_kept_groups(internvl):
    """random@vision_layer1 keeps 8 of 16 groups a tile. What enters the projector equals, per tile: layers 0-1 on
    every patch, then [CLS] and the kept groups' patches alone through the later layers, those patches put back
    at their places in a zero grid, the model's pixel shuffle, the kept groups' tokens."""
    model, processor = internvl
    x = inputs(processor, [[(224, 224)]])  # 4 tiles + thumbnail
    tower, seen = model.model.vision_tower, {}
    with torch.no_grad(), prunekit.attach(model, "random", budget=40, stage="vision_layer", layer=1) as h:
        hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.update(features=a[0]))
        try:
            model(**x)
        finally:
            hook.remove()
    kept = h.trace.events[0].kept[0]  # span positions: tile * 16 + group
    groups = adapter_for(model).feature_groups(16)
    with torch.no_grad():
        hidden = tower.embeddings(x["pixel_values"])
        for layer in tower.encoder.layer[:2]:
            hidden = layer(hidden)
        want = []
        for tile in range(5):
            ids = kept[kept // 16 == tile] % 16
            assert len(ids) == 8
            rows = torch.cat([hidden[tile, :1], hidden[tile, 1 + groups[ids].reshape(-1)]])[None]
            for layer in tower.encoder.layer[2:]:
                rows = layer(rows)
            rows = tower.layernorm(rows)
            grid = rows.new_zeros(1, 64, rows.shape[-1])
            grid[0, groups[ids].reshape(-1)] = rows[0, 1:]
            shuffled = model.model.pixel_shuffle(grid.view(1, 8, 8, -1), scale_factor=0.5).reshape(16, -1)
            want.append(shuffled[ids])
    torch.testing.assert_close(seen["features"], torch.stack(want), rtol=1e-5, atol=1e-5)


class _RaggedGroups(prunekit.TokenPruner):
    """Keeps 2..15 groups per tile inside the ViT, the count drawn from the tile's content seed."""

    name = "ragged_groups"

    def __init__(self):
        super().__init__(budget=None)

    def sites(self):
        return [prunekit.Site("vision_layer", 1)]

    def prune(self, ctx):
        keep = []
        for u in range(ctx.num_units):
            g = ctx.generator(u)
            k = int(torch.randint(2, 16, (1,), generator=g))
            keep.append(torch.randperm(int(ctx.lengths[u]), generator=g)[:k].sort().values)
        return prunekit.Keep(keep)


def test_ragged_vit_cuts_mask_the_padding_and_match_each_sample_alone(internvl):
    """Tiles keep different group counts inside the ViT: the padded rows get a key mask through the attention
    (InternVL's layers pass none on), so each sample's logits are those it has alone, and every tile's tokens reach
    the language model in their span slots."""
    model, processor = internvl
    samples = [[(224, 224)], [(224, 112)], [(112, 112)]]
    with torch.no_grad(), prunekit.attach(model, _RaggedGroups()) as h:
        x = inputs(processor, samples)
        together = model(**x, position_ids=generate_positions(x["attention_mask"])).logits[:, -1]
        counts = h.trace.vision_layer_counts[:, -1].tolist()
        kept = [h.trace.kept_positions(b) for b in range(3)]
        for b, sizes in enumerate(samples):
            x1 = inputs(processor, [sizes], first=b)
            alone = model(**x1).logits[:, -1]
            torch.testing.assert_close(alone, together[b : b + 1], rtol=1e-5, atol=1e-5)
    assert len(set(counts)) > 1 and all(c % 4 == 0 for c in counts)  # whole groups of 4 patches
    assert all(int(k.max()) < n for k, n in zip(kept, [80, 48, 16]))


def test_merges_inside_the_vit_are_refused(internvl):
    with pytest.raises(UnsupportedModelError, match="whole patch groups"):
        prunekit.attach(internvl[0], dict(name="pooling", budget=4, stage="vision_layer", layer=1))


class _ClsRows(prunekit.TokenPruner):
    """Reads the [CLS] row and the values at vision_output; keeps everything."""

    name = "cls_rows_recorder"

    def __init__(self):
        super().__init__()
        self.seen = {}

    def sites(self):
        return [prunekit.Site("vision_output")]

    def signals(self, site):
        return prunekit.Signals(rows=(prunekit.AttentionRows("first", "mean"),), values=True)

    def prune(self, ctx):
        self.seen = dict(attention=ctx.attention("first", "mean").clone(), values=ctx.values().clone())
        return None


def test_vision_output_signals_sum_each_tokens_four_patches(internvl):
    """At the projector's input a token is 4 patches: it receives the sum of their [CLS]-row probabilities (softmax
    over the tile's 65 keys at the feature layer, head mean) and the mean of their values, computed here by hand
    from the feature layer's own q, k, v."""
    model, processor = internvl
    x = inputs(processor, [[(224, 112)]])  # 3 tiles
    layer = model.model.vision_tower.encoder.layer[-1]
    captured = {}
    hook = layer.attention.register_forward_pre_hook(lambda m, a: captured.update(hidden=a[0]))
    strategy = _ClsRows()
    try:
        with torch.no_grad(), prunekit.attach(model, strategy):
            model(**x)
    finally:
        hook.remove()
    attn, h = layer.attention, captured["hidden"]
    split = lambda t: t.view(*h.shape[:2], attn.num_heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = (split(p(h)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    probs = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * attn.scale, -1)[:, :, 0].mean(1)  # (tiles, 65)
    for token, (r, c) in enumerate((r, c) for r in range(4) for c in range(4)):
        patches = [1 + 8 * (2 * r + dr) + 2 * c + dc for dr in (0, 1) for dc in (0, 1)]
        torch.testing.assert_close(strategy.seen["attention"][:, token], probs[:, patches].sum(-1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(strategy.seen["values"][:, :, token], v[:, :, patches].mean(2), rtol=1e-5, atol=1e-6)


def test_vision_side_budget_is_per_image_split_over_its_most_tiles(internvl):
    """budget 20 over the tiny model's most tiles (4 + thumbnail = 5): 4 tokens a tile; a 5-tile image keeps 20, a
    3-tile one (2 tiles + thumbnail) 12."""
    model, processor = internvl
    assert adapter_for(model).budget_units() == 5
    with torch.no_grad(), prunekit.attach(model, "random", budget=20) as h:
        model(**inputs(processor, [[(224, 224)], [(224, 112)]]))
    assert h.trace.n_vanilla == [80, 48] and h.trace.n_in == [20, 12]

"""Hand-worked cases for the first strategies, and what their decisions look like through the runtime."""
import pytest
import torch
import torch.nn.functional as F

import prunekit
from prunekit import Budget, PruneContext, Site
from helpers import batch
from prunekit.strategies.pooling import pool_grid, pool_windows


def context(tokens, budget, grid=None, seeds=None):
    units = tokens.shape[0]
    return PruneContext(
        site=Site("vision_output"), tokens=tokens, lengths=torch.full((units,), tokens.shape[1]),
        grids=[grid] * units, sample_of=list(range(units)), budget=Budget(budget),
        _seed_source=(seeds or (lambda u: 1234)),
    )


@pytest.mark.parametrize("rows, cols, budget, expected", [
    (24, 24, 64, (8, 8)), (24, 24, 144, (12, 12)), (24, 24, 192, (16, 12)), (24, 24, 576, (24, 24)),
    (8, 8, 16, (4, 4)), (8, 8, 32, (8, 4)), (8, 8, 7, (7, 1)), (4, 6, 6, (2, 3)),
])
def test_pool_grid_multiplies_to_the_budget(rows, cols, budget, expected):
    assert pool_grid(rows, cols, budget) == expected


def test_pool_windows_on_a_4x4_grid_by_hand():
    reps, members = pool_windows(4, 4, 2, 2)
    assert reps.tolist() == [0, 2, 8, 10]
    assert [m.tolist() for m in members] == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_pool_windows_overlap_like_adaptive_pooling_on_3x3():
    reps, members = pool_windows(3, 3, 2, 2)
    assert [m.tolist() for m in members] == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    assert reps.tolist() == [0, 1, 3, 4]


@pytest.mark.parametrize("rows, cols, budget", [(4, 4, 4), (3, 3, 4), (6, 6, 9), (8, 8, 32)])
def test_pooled_features_equal_adaptive_avg_pool2d(rows, cols, budget):
    tokens = torch.randn(2, rows * cols, 5)
    keep = prunekit.build_strategy("pooling", budget=budget).prune(context(tokens, budget, (rows, cols)))
    h, w = pool_grid(rows, cols, budget)
    grid = tokens.transpose(1, 2).reshape(2, 5, rows, cols)
    ref = F.adaptive_avg_pool2d(grid, (h, w)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(torch.stack(keep.features), ref)


def test_random_is_seeded_per_unit_sorted_and_exact():
    tokens = torch.randn(3, 64, 4)
    strategy = prunekit.build_strategy("random", budget=10)
    a = strategy.prune(context(tokens, 10, seeds=lambda u: [7, 8, 7][u]))
    assert all(len(i) == 10 and torch.equal(i, i.sort().values) for i in a.indices)
    assert torch.equal(a.indices[0], a.indices[2]) and not torch.equal(a.indices[0], a.indices[1])
    b = strategy.prune(context(tokens[1:2], 10, seeds=lambda u: 8))
    assert torch.equal(b.indices[0], a.indices[1])


def test_random_keeps_the_same_tokens_for_an_image_whatever_the_batch(model, processor):
    with prunekit.attach(model, "random", budget=16) as h:
        model(**batch(processor, [0, 1]))
        first = [h.trace.kept_positions(b) for b in range(2)]
        model(**batch(processor, [1]))
        assert torch.equal(h.trace.kept_positions(0), first[1])
        assert not torch.equal(first[0], first[1])  # different images, different draws


def test_pooling_trace_lists_window_members_through_the_runtime(model, processor):
    with prunekit.attach(model, "pooling", budget=16) as h:
        model(**batch(processor, [0]))
    reps, members = pool_windows(8, 8, 4, 4)
    assert torch.equal(h.trace.kept_positions(0), reps)
    assert [m.tolist() for m in h.trace.members(0)] == [m.tolist() for m in members]
    assert h.trace.images(0).tolist() == [0] * 16


def test_llm_layer_pooling_merges_hidden_states_with_members(model, processor):
    with prunekit.attach(model, "pooling", budget=4, stage="llm_layer", layer=1) as h:
        model(**batch(processor, [0]))
    assert [len(m) for m in h.trace.members(0)] == [16] * 4
    assert h.trace.n_avg == [(1 * 64 + 3 * 4) / 4]


def test_strategy_returning_duplicates_is_caught(model, processor):
    from prunekit import Keep, TokenPruner

    class Dup(TokenPruner):
        name = "dup"

        def sites(self):
            return [Site("vision_output")]

        def prune(self, ctx):
            return Keep([torch.tensor([1, 1, 2])] * ctx.num_units)

    with prunekit.attach(model, Dup()):
        with pytest.raises(prunekit.PruningError, match="kept a token twice"):
            model(**batch(processor, [0]))

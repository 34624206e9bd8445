"""Ragged keep counts (different per sample) at every stage: re-padded batches equal batch 1."""
import pytest
import torch

import prunekit
from prunekit import Site, TokenPruner
from helpers import batch, greedy, ragged_keep, recompute_last_logits

pytestmark = pytest.mark.contract  # the runtime contract: CI runs it on every transformers minor


class RaggedRandom(TokenPruner):
    """Keeps 5..16 tokens per unit, the count drawn from the unit's content seed."""

    name = "ragged_random"

    def __init__(self, site: Site, positions: str):
        super().__init__(budget=None)
        self.site, self.position_policy = site, positions

    def sites(self):
        return [self.site]

    def prune(self, ctx):
        return ragged_keep(ctx)


SITES = {
    "vision_layer0": (Site("vision_layer", 0), "compact"),
    "vision_output": (Site("vision_output"), "compact"),
    "projector_output-original": (Site("projector_output"), "original"),
    "llm1-original": (Site("llm_layer", 1), "original"),
    "llm2-compact": (Site("llm_layer", 2), "compact"),
}


@pytest.mark.parametrize("key", list(SITES))
def test_ragged_counts_batch_equals_batch_of_one_and_cache_equals_recompute(model, processor, key):
    x4 = batch(processor, [0, 1, 2, 3])
    with prunekit.attach(model, RaggedRandom(*SITES[key])) as h:
        logits4 = model(**x4).logits[:, -1]
        counts = h.trace.n_final
        assert len(set(counts)) > 1, f"the test needs ragged counts, got {counts}"
        tokens4, step_logits = greedy(model, x4, 3)
        for b in range(4):
            x1 = batch(processor, [b])
            torch.testing.assert_close(model(**x1).logits[:, -1], logits4[b : b + 1], rtol=1e-5, atol=1e-5)
            assert h.trace.n_final == [counts[b]]
            assert torch.equal(greedy(model, x1, 3)[0], tokens4[b : b + 1])
        model(**x4)
        with h.replay():
            for t in range(3):
                out = recompute_last_logits(model, x4, tokens4[:, :t])
                torch.testing.assert_close(out, step_logits[:, t], rtol=1e-5, atol=1e-5)

"""Operations strategies share: stable top-k selection, ragged gathers, the benchmarks' post-prompts.

Part of the contract layer: strategies import these, never each other's helpers.
"""
from __future__ import annotations

import torch
from torch import Tensor


def select_top(scores: Tensor, live: Tensor, counts: Tensor) -> list[Tensor]:
    """Per unit, the ``counts[u]`` highest live scores (ties: lower index first), in ascending order."""
    order = torch.sort(scores.masked_fill(~live, float("-inf")), dim=-1, descending=True, stable=True).indices
    return [order[u, : int(k)].sort().values for u, k in enumerate(counts.tolist())]


def gather_rows(x: Tensor, indices: list[Tensor]) -> Tensor:
    """(U, max k): x[u, indices[u]], zero right-padded."""
    out = x.new_zeros(x.shape[0], max(len(i) for i in indices))
    for u, idx in enumerate(indices):
        out[u, : len(idx)] = x[u, idx]
    return out


# The benchmarks' short-answer instructions that follow the question in LLaVA-style prompts; methods that read
# the instruction before the LLM (MMTok's keywords, CDPruner's CLIP text) drop them first, as their references do.
POST_PROMPTS = ("Answer the question using a single word or phrase.",
                "Answer with the option's letter from the given choices directly.")


def without_post_prompts(text: str) -> str:
    """``text`` with every benchmark post-prompt (and the newline before it) removed, stripped."""
    for post in POST_PROMPTS:
        text = text.replace("\n" + post, "").replace(post, "")
    return text.strip()

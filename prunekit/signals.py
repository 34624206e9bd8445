"""What a strategy may ask the runtime to measure at a site: ``Signals`` (attention rows, keys, values, pre,
prompt, prefix, instruction) and ``AttentionRows``.
The runtime computes them from the model's own attention calls, without
eager attention or N x N maps (``prunekit.runtime.probe``; docs/architecture.md, Signals).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import SignalError  # noqa: F401  (part of this module's API)

QUERIES = ("first", "last", "mean", "mean_hidden", "all", "text")


@dataclass(frozen=True)
class AttentionRows:
    """Attention probabilities of chosen queries over all keys, head-averaged or per head.

    ``first``: the first live query (CLS in a ViT). ``last``: the last query (the last prompt token).
    ``mean``: one synthetic query, the mean of the live query vectors (a global token, for towers
    without CLS); it takes the last live row's mask. ``mean_hidden``: the query of a global token built
    from the mean of the live residual-stream states entering the layer (paper §3.1 wording; vision
    towers only, no RoPE). ``all``: the mean over every live query of its attention row (FastV paper's
    φ(j) = 1/n Σ_i A(i, j), causal), computed a chunk of rows at a time. ``text``: every text-token query
    of the prompt (rater candidates), one row each.
    """

    query: str = "last"
    heads: str = "mean"

    def __post_init__(self):
        if self.query not in QUERIES:
            raise ValueError(f"unknown query {self.query!r}; choose one of {QUERIES}")
        if self.heads not in ("mean", "all"):
            raise ValueError(f"heads must be 'mean' or 'all', got {self.heads!r}")


@dataclass(frozen=True)
class Signals:
    """What a strategy needs at one site besides the tokens: attention rows, keys, values.

    ``pre`` (``llm_layer[k]`` sites only): compute them from block k itself on the hidden states entering
    it, before it runs — its input norm, then its attention module's q/k/v projections (and q/k norms if
    it has them), RoPE at the current positions and its scaling — instead of from layer k-1's attention.

    ``prompt`` (``llm_layer`` sites only): keep the language model's input embeddings of the visual and text
    tokens for ``ctx.prompt_embeddings()`` (SparseVLM's raters). ``prefix`` (``vision_output`` only): keep the
    feature layer's output at the encoder's prefix tokens (CLS) for ``ctx.prefix_tokens()`` (VisionZip feeds
    it to the projector). ``instruction`` (pre-LLM sites): each unit's instruction, the user's text of its sample,
    with ``ctx.instruction(u)`` (MMTok, CDPruner); it needs ``attach(..., processor=)`` or explicit texts. None of
    these three is an attention signal: they need no probe.
    """

    rows: tuple[AttentionRows, ...] = ()
    keys: bool = False
    values: bool = False
    pre: bool = False
    prompt: bool = False
    prefix: bool = False
    instruction: bool = False

    def __bool__(self) -> bool:
        """True when attention must be probed (rows, keys or values)."""
        return bool(self.rows) or self.keys or self.values

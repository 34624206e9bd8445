"""Relay tokens and token-scoring functions, each in a small registry (FlowCut and its ablations).

A *relay* is the token whose view of the others scores them: CLS in a ViT, a synthetic mean query for
towers without CLS, the last prompt token inside a language model. It names the attention row it reads
(``AttentionRows.query``) and the value vector used as the semantic reference.

A *score function* turns the per-token criteria (``ScoreInputs``) into one score per token, higher =
keep. It must work row by row (each unit's scores from its own row only): FlowCut stacks the layers between
two cuts along the units and scores them in one call. Add either without touching a strategy::

    @register_score("attention_times_norm")
    def attention_times_norm(x: ScoreInputs) -> Tensor:
        return x.attention * x.value_norm

then run ``strategy=flowcut strategy.score=attention_times_norm``.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from torch import Tensor


@dataclass(frozen=True)
class Relay:
    """``query``: the attention row it reads (first / last / mean); ``value``: its value vector, or None."""

    query: str
    value: str | None


@dataclass
class ScoreInputs:
    """Per-unit criteria over the current tokens, (U, N) each, fp32; a disabled criterion is None.

    ``attention``: the relay's head-mean attention (softmax over all keys); ``semantic``: head-mean
    softmax of the relay value against each token's value; ``value_norm``: the L1 norm of each token's
    head-averaged value; ``live``: (U, N) real tokens (the rest is padding).
    """

    attention: Tensor | None
    semantic: Tensor | None
    value_norm: Tensor | None
    live: Tensor


RELAYS: dict[str, Relay] = {}
SCORES: dict[str, Callable[[ScoreInputs], Tensor]] = {}


def register_relay(name: str, relay: Relay) -> Relay:
    if name in RELAYS:
        raise ValueError(f"relay {name!r} is already registered")
    RELAYS[name] = relay
    return relay


def register_score(name: str):
    def wrap(fn):
        if name in SCORES:
            raise ValueError(f"score function {name!r} is already registered")
        SCORES[name] = fn
        return fn

    return wrap


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        close = difflib.get_close_matches(name, table, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown {what} {name!r}; registered: {', '.join(sorted(table))}.{hint}")
    return table[name]


def get_relay(name: str) -> Relay:
    return _lookup(RELAYS, name, "relay")


def get_score(name: str) -> Callable[[ScoreInputs], Tensor]:
    return _lookup(SCORES, name, "score function")


def normalise(x: Tensor, live: Tensor) -> Tensor:
    """x / sum over the unit's live tokens (zero where the sum is zero)."""
    x = x * live
    total = x.sum(-1, keepdim=True)
    return x / total.masked_fill(total == 0, 1)


register_relay("cls", Relay(query="first", value="first"))  # FlowCut on CLIP (LLaVA)
register_relay("mean_query", Relay(query="mean", value="mean"))  # FlowCut's Qwen2-VL port: a global query
register_relay("mean_hidden", Relay(query="mean_hidden", value="mean_hidden"))  # paper §3.1: a global token
register_relay("last", Relay(query="last", value="last"))  # the last prompt token (LLM stage)


@register_score("flowcut")
def flowcut_score(x: ScoreInputs) -> Tensor:
    """(norm(attention) + norm(semantic)) * value_norm, with any disabled criterion left out (docs/strategies/docs/strategies/flowcut.md)."""
    terms = [normalise(t, x.live) for t in (x.attention, x.semantic) if t is not None]
    score = sum(terms) if terms else x.live.float()
    if x.value_norm is not None:
        score = score * x.value_norm
    return score

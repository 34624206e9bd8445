"""Token budgets and the three accounting conventions (docs/strategies.md).

- ``n_in``: visual tokens entering the language model;
- ``n_final``: visual tokens after the last pruning step (what reaches the last layer);
- ``n_avg``: layer-averaged visual tokens over the language model's layers (each layer counted with
  the tokens it takes as input);
- ``n_avg_out``: the same average with each layer counted by the tokens it outputs, so a layer followed by a
  cut counts the survivors (SparseVLM's logger; its "192" is 192.03 here and 206.5 under ``n_avg``).

Papers mix these; prunekit logs all three and records which one a budget constrained.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

CONVENTIONS = ("n_in", "n_final", "n_avg", "n_avg_out")


def kept_fraction(strategy: str, keep_ratio: float | None, drop_ratio: float | None = None,
                  drop_name: str = "R") -> float:
    """The one meaning of a fraction in prunekit: the share of a unit's visual tokens that is KEPT. A paper's
    drop ratio (FastV's R) is translated here, at the edge."""
    if keep_ratio is not None and drop_ratio is not None:
        raise ValueError(f"{strategy}: give keep_ratio (the share kept) or {drop_name} (the share dropped), not both")
    keep = keep_ratio if keep_ratio is not None else 1.0 - drop_ratio
    if not 0.0 < keep <= 1.0:
        given = f"keep_ratio={keep_ratio}" if keep_ratio is not None else f"{drop_name}={drop_ratio}"
        raise ValueError(f"{strategy}: {given} keeps a share {keep:g} of the image tokens; it must be in (0, 1]")
    return keep


@dataclass(frozen=True)
class Budget:
    tokens: int
    convention: str = "n_in"

    def __post_init__(self):
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, numbers.Integral):
            raise TypeError(f"budget must be a whole number of visual tokens, got {self.tokens!r}")
        if self.tokens <= 0:
            raise ValueError(
                f"budget must be > 0 visual tokens, got {self.tokens}. "
                "To keep every token use the `keep_all` strategy."
            )
        if self.convention not in CONVENTIONS:
            raise ValueError(f"unknown budget convention {self.convention!r}; choose one of {CONVENTIONS}")
        object.__setattr__(self, "tokens", int(self.tokens))


def layer_average(counts_per_layer: list[int]) -> float:
    """n_avg: the mean over layers of the visual tokens each layer takes as input."""
    return sum(counts_per_layer) / len(counts_per_layer) if counts_per_layer else 0.0


def layer_average_out(counts_per_layer: list[int]) -> float:
    """n_avg_out: layer l counted with what it outputs, i.e. layer l+1's input; the last layer with its input."""
    if not counts_per_layer:
        return 0.0
    return (sum(counts_per_layer[1:]) + counts_per_layer[-1]) / len(counts_per_layer)


def schedule_average(n: int, boundaries: list[int], counts: list[int], num_layers: int) -> float:
    """n_avg of a staged in-LLM schedule: ``n`` visual tokens in layers 0..b_1-1, then ``counts[s]`` from
    layer ``boundaries[s]`` on: (1/T) Σ_s (b_{s+1} - b_s) · n_s with b_0 = 0, b_{S+1} = T (docs/strategies/pdrop.md)."""
    edges, tokens = [0, *boundaries, num_layers], [n, *counts]
    return sum((edges[s + 1] - edges[s]) * tokens[s] for s in range(len(tokens))) / num_layers


def single_cut_keep(target: float, n: int, cut: int, num_layers: int) -> float:
    """Tokens to keep after one cut before layer ``cut`` so that the layer average is ``target`` (n_avg):
    k = (T·t - K·N) / (T - K) (docs/strategies/fastv.md), before any rounding; negative when unreachable."""
    return (num_layers * target - cut * n) / (num_layers - cut)

"""Timing and memory primitives of the speed benchmark: CUDA events on a GPU, ``perf_counter`` with
synchronisation on CPU; warm-up calls excluded; median and p90 over repeats; peak CUDA memory."""
from __future__ import annotations

import gc
import math
import statistics
from contextlib import contextmanager
from typing import Callable

import torch

from ..timing import Clock


def repeat(fn: Callable[[], object], clock: Clock, repeats: int, warmup: int) -> list[float]:
    """Milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones. As ``timeit`` does, Python's
    garbage collector stays out of the timed calls (collected before each, paused during it): otherwise a
    collection triggered by one measurement's allocations lands in whichever call comes next."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        clock.sync()
        gc.disable()
        try:
            start = clock.mark()
            fn()
            times.append(clock.elapsed_ms(start, clock.mark()))
        finally:
            gc.enable()
    return times


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"median": statistics.median(ordered), "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]}


def median_interval(values: list[float], level: float = 0.95) -> list[float] | None:
    """A distribution-free confidence interval for the median: the order statistics x_(k) and x_(n+1-k), k the
    largest rank with P(Binomial(n, 1/2) < k) <= (1 - level) / 2, so the coverage is at least ``level`` whatever
    the distribution (e.g. n = 10 at 95 %: the 2nd and 9th values, 97.9 %). None when n is too small (n < 6 at
    95 %: even the extremes cover less)."""
    n, tail = len(values), (1 - level) / 2
    k, below = 0, 0.0  # below = P(Bin(n, 1/2) < k + 1) as k grows
    while k < n // 2:
        below += math.comb(n, k) / 2**n
        if below > tail:
            break
        k += 1
    if k == 0:
        return None
    ordered = sorted(values)
    return [ordered[k - 1], ordered[n - k]]


@contextmanager
def peak_memory(device: torch.device):
    """``with peak_memory(device) as peak: ...`` then ``peak()``: peak allocated bytes (None on CPU)."""
    if device.type != "cuda":
        yield lambda: None
        return
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    result = {}
    yield lambda: result.get("peak")
    torch.cuda.synchronize()
    result["peak"] = torch.cuda.max_memory_allocated(device)


class ScoringTimer:
    """Time a strategy spends deciding: its ``prune`` calls plus the probe's signal computations (rows, keys,
    values, pre-block projections), summed per forward. Wraps methods of prunekit's own objects (the strategy
    and the handle's probe) on the instance; ``remove()`` restores them."""

    PROBE_METHODS = ("_capture", "capture_input", "flush")

    def __init__(self, handle, clock: Clock):
        self.clock, self.spans, self._restore = clock, [], []
        self._wrap(handle.strategy, "prune")
        if handle._probe is not None:
            for name in self.PROBE_METHODS:
                self._wrap(handle._probe, name)

    def _wrap(self, obj, name: str) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            start = self.clock.mark()
            out = inner(*args, **kwargs)
            self.spans.append((start, self.clock.mark()))
            return out

        setattr(obj, name, timed)
        self._restore.append((obj, name))

    def take_ms(self) -> float:
        """Milliseconds recorded since the last call."""
        total = sum(self.clock.elapsed_ms(s, e) for s, e in self.spans)
        self.spans = []
        return total

    def remove(self) -> None:
        for obj, name in self._restore:
            obj.__dict__.pop(name, None)
        self._restore = []

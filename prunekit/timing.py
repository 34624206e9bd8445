"""Prefill timing of one ``generate`` call, from hooks on the model instance (docs/evaluation.md).

``prefill_ms`` runs from the call to the end of the first forward: vision tower, projector, pruning and
the language-model prefill, i.e. the time to the first token's logits. (transformers 5.23's ``generate``
encodes the images before its first forward, 5.17's inside it; this span covers both.) ``vision_ms`` is
the vision tower alone, ``decode_ms`` the rest of the call. CUDA events on a GPU, ``perf_counter`` on CPU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn


class Clock:
    """CUDA events on a GPU, ``perf_counter`` on CPU (the speed benchmark uses it too)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3


@dataclass
class GenerateTiming:
    prefill_ms: float
    vision_ms: float
    decode_ms: float
    forwards: int  # forward calls: 1 prefill + decode steps


@dataclass
class PrefillTimer:
    """``with PrefillTimer(model, vision_tower) as t: model.generate(...)`` then ``t.result``."""

    model: nn.Module
    vision_tower: nn.Module | None = None
    _marks: dict = field(default_factory=dict)
    _handles: list = field(default_factory=list)
    _forwards: int = 0
    result: GenerateTiming | None = None

    def __enter__(self) -> "PrefillTimer":
        device = next(self.model.parameters()).device
        self._clock = Clock(device)
        self._handles = [self.model.register_forward_hook(self._after_forward)]
        if self.vision_tower is not None:
            self._handles += [
                self.vision_tower.register_forward_pre_hook(lambda *_: self._mark_once("vision_start")),
                self.vision_tower.register_forward_hook(lambda *_: self._mark_once("vision_end")),
            ]
        if self._clock.cuda:
            torch.cuda.synchronize()
        self._marks = {"start": self._clock.mark()}
        return self

    def _mark_once(self, name: str) -> None:
        self._marks.setdefault(name, self._clock.mark())

    def _after_forward(self, *_):
        self._forwards += 1
        self._mark_once("prefill_end")

    def __exit__(self, *exc) -> None:
        end = self._clock.mark()
        for h in self._handles:
            h.remove()
        if exc[0] is not None:
            return
        m, clock = self._marks, self._clock
        prefill_end = m.get("prefill_end", end)
        vision = clock.elapsed_ms(m["vision_start"], m["vision_end"]) if "vision_end" in m else 0.0
        self.result = GenerateTiming(
            prefill_ms=clock.elapsed_ms(m["start"], prefill_end),
            vision_ms=vision,
            decode_ms=clock.elapsed_ms(prefill_end, end),
            forwards=self._forwards,
        )

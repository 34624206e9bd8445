"""The speed benchmark: vanilla and every strategy x budget, side by side in one process (docs/benchmarks.md).

Per (shape, batch, strategy, budget) it measures the prefill (one forward over the prompt, the KV cache
filled), end-to-end ``generate`` and its decode rate, peak memory, the oracle floor of the same schedule
(prunekit/bench/oracle.py), the scoring time (signals + selection), and, for strategies whose published code
computes full attention maps eagerly, the same strategy in that reference style. Analytic FLOPs come from the
trace, so every timing sits next to its vanilla / pruned FLOPs ratio.
"""
from __future__ import annotations

import functools
import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import compat
from ..timing import PrefillTimer
from ..flops import FlopsModel, trace_flops
from ..registry import build_strategy
from ..runtime import PruningError, attach
from .measure import Clock, ScoringTimer, median_interval, peak_memory, repeat, summary
from .oracle import oracle_prefill, schedule
from .shapes import Shape, build

log = logging.getLogger("prunekit.bench")

# strategies whose reference code runs eager attention with every map materialised, and where
REFERENCE_STYLE = {"flowcut": "vision", "visionzip": "vision", "fastervlm": "vision", "fastv": "text",
                   "sparsevlm": "text"}


def run(shapes: list[str], batch_sizes: list[int], strategies: list, budgets: dict, device: str, dtype: torch.dtype,
        attn: str = "sdpa", repeats: int = 10, warmup: int = 3, new_tokens: int = 16, reference_style: bool = True,
        out: Path | None = None) -> list[dict]:
    rows = []
    for name in shapes:
        shape = build(name, device, dtype, attn)
        flops = FlopsModel.from_model(shape.model)
        for batch in batch_sizes:
            bench = _Bench(shape, batch, flops, repeats, warmup, new_tokens)
            rows.append(_emit(bench.vanilla(), out))
            for spec in strategies:
                for budget in budgets.get(shape.family, []):
                    row = bench.strategy(spec, budget, reference_style)
                    rows.append(_emit(row, out))
        del shape
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _emit(row: dict, out: Path | None) -> dict:
    log.info(format_row(row))
    if out is not None:
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


class _Bench:
    """One (shape, batch): vanilla, then each strategy x budget. Ratios are taken per round from calls made back
    to back (vanilla, then pruned and oracle in alternating order, then reference style), then the median over
    rounds, so drifting machine speed (shared CPUs, GPU clocks) cancels in the ratios."""

    def __init__(self, shape: Shape, batch: int, flops: FlopsModel, repeats: int, warmup: int, new_tokens: int):
        self.shape, self.batch, self.flops = shape, batch, flops
        self.repeats, self.warmup, self.new_tokens = repeats, warmup, new_tokens
        self.model, self.x = shape.model, shape.inputs(batch)
        self.clock = Clock(shape.device)
        self.base = {"shape": shape.name, "family": shape.family, "batch": batch, "device": str(shape.device),
                     "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
                     "visual_tokens": shape.visual_tokens}

    @contextmanager
    def pruned(self, strategy):
        """``strategy`` attached; strategies that read the instruction before the LLM get a fixed question per row
        (the shapes have no processor: a small stand-in tokenizer encodes it, ids inside every shape's vocabulary)."""
        with attach(self.model, strategy, processor=_bench_tokenizer()) as handle, \
                handle.instructions([BENCH_QUESTION] * self.batch):
            yield handle

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        return self.model(**self.x, use_cache=True, logits_to_keep=1).logits

    def time(self, fn) -> float:
        return repeat(fn, self.clock, 1, 0)[0]

    @torch.no_grad()
    def timed_generate(self) -> dict:
        results = []
        for i in range(self.warmup + self.repeats):
            with PrefillTimer(self.model) as t:
                self.model.generate(**self.x, max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                                    do_sample=False)
            if i >= self.warmup:
                results.append(t.result)
        e2e = [r.prefill_ms + r.decode_ms for r in results]
        decode_s = sum(r.decode_ms for r in results) / 1e3
        return {"generate_ms": summary(e2e)["median"],
                "decode_tokens_per_s": self.batch * (self.new_tokens - 1) * len(results) / decode_s if decode_s else None}

    def tflops(self, trace) -> float:
        """Exact TFLOPs of the batch's prefill."""
        text = self.x["input_ids"].shape[1] - trace.n_vanilla[0]
        return sum(trace_flops(self.flops, trace, b, text)["exact"] for b in range(self.batch)) / 1e12

    def vanilla(self) -> dict:
        with attach(self.model, "keep_all") as h:  # the trace of an unpruned pass, for FLOPs
            self.prefill()
        self.vanilla_tflops = self.tflops(h.trace)
        times, oracle = [], []
        with peak_memory(self.shape.device) as peak:
            for r in range(self.warmup + self.repeats):
                t, o = self.time(self.prefill), self.time(lambda: oracle_prefill(self.model, self.x, None))
                if r >= self.warmup:
                    times.append(t)
                    oracle.append(o)
        prefill = summary(times)
        return {**self.base, "strategy": "vanilla", "budget": None, "prefill_ms": prefill["median"],
                "prefill_p90_ms": prefill["p90"], "oracle_ms": summary(oracle)["median"],
                "pruned_over_oracle": _median_ratio(times, oracle),
                "pruned_over_oracle_ci": _ratio_interval(times, oracle), "peak_mem_gb": _gb(peak()),
                "tflops": self.vanilla_tflops, "speedup": 1.0, "flops_ratio": 1.0, **self.timed_generate()}

    def strategy(self, spec, budget: int, reference_style: bool) -> dict:
        strategy = build_strategy(spec, budget=budget, **self.aux_knobs(spec))
        row = {**self.base, "strategy": strategy.name, "budget": budget, "knobs": _knobs(spec)}
        try:
            with self.pruned(strategy):
                pass
        except (PruningError, ValueError) as err:
            return {**row, "refused": str(err)}
        try:
            return {**row, **self.measure(strategy, reference_style)}
        except (PruningError, ValueError) as err:  # data-dependent limits (e.g. an unreachable budget) surface here
            return {**row, "refused": str(err)}

    def aux_knobs(self, spec) -> dict:
        """CDPruner's CLIP text encoder: a random stand-in matching this shape's vision width (the speed of its
        selection does not depend on the weights; the stand-in's text tower is small, see docs/benchmarks.md)."""
        name = spec if isinstance(spec, str) else spec.get("name")
        if name != "cdpruner" or (isinstance(spec, dict) and "text_encoder" in spec):
            return {}
        from ..tiny import tiny_clip_text_dir

        return {"text_encoder": str(tiny_clip_text_dir(vision_width=self.shape.vision_width))}

    def measure(self, strategy, reference_style: bool) -> dict:
        where = REFERENCE_STYLE.get(strategy.name) if reference_style else None
        rounds = {"vanilla": [], "pruned": [], "oracle": [], "scoring": [], "reference": []}
        peaks = {}
        plan = None
        for r in range(self.warmup + self.repeats):
            keep = r >= self.warmup
            vanilla = self.time(self.prefill)
            oracle_first = plan is not None and r % 2 == 1  # alternate the order: neither gets the same slot
            if oracle_first:
                oracle = self.time(lambda: oracle_prefill(self.model, self.x, plan))
            with self.pruned(strategy) as handle, peak_memory(self.shape.device) as peak:
                timer = ScoringTimer(handle, self.clock)
                try:
                    pruned = self.time(self.prefill)
                    scoring = timer.take_ms()
                finally:
                    timer.remove()
            peaks["pruned"], trace = peak(), handle.trace
            plan = schedule(trace)  # deterministic strategies: the same every round
            if not oracle_first:
                oracle = self.time(lambda: oracle_prefill(self.model, self.x, plan))
            if where is not None:
                with _reference_style(self.model, handle.adapter, where), self.pruned(strategy), \
                        peak_memory(self.shape.device) as ref_peak:
                    reference = self.time(self.prefill)
                if keep:
                    rounds["reference"].append(reference)
                peaks["reference"] = ref_peak()
            if keep:
                for key, value in (("vanilla", vanilla), ("pruned", pruned), ("oracle", oracle), ("scoring", scoring)):
                    rounds[key].append(value)
        with self.pruned(strategy):
            generate = self.timed_generate()
        pruned = summary(rounds["pruned"])
        tflops = self.tflops(trace)
        row = dict(
            prefill_ms=pruned["median"], prefill_p90_ms=pruned["p90"], oracle_ms=summary(rounds["oracle"])["median"],
            pruned_over_oracle=_median_ratio(rounds["pruned"], rounds["oracle"]),
            pruned_over_oracle_ci=_ratio_interval(rounds["pruned"], rounds["oracle"]),
            scoring_ms=summary(rounds["scoring"])["median"],
            scoring_share=_median_ratio(rounds["scoring"], rounds["pruned"]), peak_mem_gb=_gb(peaks["pruned"]),
            tflops=tflops, speedup=_median_ratio(rounds["vanilla"], rounds["pruned"]),
            floor_speedup=_median_ratio(rounds["vanilla"], rounds["oracle"]),
            flops_ratio=self.vanilla_tflops / tflops, n_in=sum(trace.n_in) / self.batch,
            n_final=sum(trace.n_final) / self.batch, n_avg=sum(trace.n_avg) / self.batch, **generate,
        )
        if rounds["reference"]:
            row.update(reference_ms=summary(rounds["reference"])["median"], reference_peak_mem_gb=_gb(peaks["reference"]),
                       reference_over_prunekit=_median_ratio(rounds["reference"], rounds["pruned"]))
        return row


BENCH_QUESTION = "What is the colour of the man's shirt?\nAnswer the question using a single word or phrase."


@functools.cache
def _bench_tokenizer():
    from ..tiny import build_tokenizer

    return build_tokenizer()


def _median_ratio(a: list[float], b: list[float]) -> float:
    return summary([x / y for x, y in zip(a, b)])["median"]


def _ratio_interval(a: list[float], b: list[float]) -> list[float] | None:
    """95 % interval of the median per-round ratio (the decision rule: median of >= 10 rounds, with its interval)."""
    return median_interval([x / y for x, y in zip(a, b)])


@contextmanager
def _reference_style(model, adapter, where: str):
    """Eager attention with every attention map returned, in the vision tower or the language model: what the
    published code computes (docs/benchmarks.md, reference style)."""
    key = "vision_config" if where == "vision" else "text_config"
    module = adapter.vision_tower if where == "vision" else adapter.language_model
    before = compat.attn_implementation(getattr(model.config, key))
    model.set_attn_implementation({key: "eager"})
    hook = module.register_forward_pre_hook(lambda m, a, k: (a, compat.asking_attention_maps(k)), with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()
        model.set_attn_implementation({key: before})


def _gb(n: int | None) -> float | None:
    return None if n is None else n / 2**30


def _knobs(spec) -> dict:
    return {k: v for k, v in spec.items() if k != "name"} if isinstance(spec, dict) else {}


COLUMNS = [("shape", "{}"), ("batch", "{}"), ("strategy", "{}"), ("budget", "{}"), ("n_avg", "{:.0f}"),
           ("prefill_ms", "{:.1f}"), ("oracle_ms", "{:.1f}"), ("pruned_over_oracle", "{:.2f}"),
           ("pruned_over_oracle_ci", "[{:.2f}, {:.2f}]"),
           ("scoring_share", "{:.1%}"), ("speedup", "{:.2f}"), ("floor_speedup", "{:.2f}"),
           ("flops_ratio", "{:.2f}"), ("tflops", "{:.3g}"), ("generate_ms", "{:.0f}"),
           ("decode_tokens_per_s", "{:.0f}"), ("peak_mem_gb", "{:.2f}"), ("reference_ms", "{:.1f}"),
           ("reference_over_prunekit", "{:.2f}"), ("reference_peak_mem_gb", "{:.2f}")]


def format_row(row: dict) -> str:
    if "refused" in row:
        return f"{row['shape']} b{row['batch']} {row['strategy']}@{row['budget']}: refused ({row['refused']})"
    return " ".join(f"{k}={_cell(fmt, row[k])}" for k, fmt in COLUMNS if row.get(k) is not None)


def _cell(fmt: str, value) -> str:
    return fmt.format(*value) if isinstance(value, (list, tuple)) else fmt.format(value)


def markdown(rows: list[dict]) -> str:
    """The results as one Markdown table (refusals listed below it)."""
    kept = [r for r in rows if "refused" not in r]
    lines = ["| " + " | ".join(k for k, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in kept:
        lines.append("| " + " | ".join("" if r.get(k) is None else _cell(fmt, r[k]) for k, fmt in COLUMNS) + " |")
    refused = [f"- {r['shape']} b{r['batch']} {r['strategy']}@{r['budget']}: {r['refused']}" for r in rows if "refused" in r]
    return "\n".join(lines + (["", "Not measured (attach or the first prefill refused):"] + refused if refused else [])) + "\n"

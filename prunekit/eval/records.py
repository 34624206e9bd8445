"""Per-sample records: gathered across ranks, de-duplicated by row id, summarised into metrics.json."""
from __future__ import annotations

import numpy as np
import torch.distributed as dist

from .benchmarks import Benchmark
from .metrics import mean


def encode_positions(positions) -> str:
    """Span positions as a hex bitmask (bit i set: position i survived): LLaVA-1.5's 576 in at most 144 characters.
    The order of the positions and merges' members are not kept (``PruneTrace`` has them)."""
    mask = 0
    for i in positions:
        mask |= 1 << int(i)
    return format(mask, "x")


def decode_positions(mask: str) -> list[int]:
    """The positions of an ``encode_positions`` mask, ascending."""
    value = int(mask, 16)
    return [i for i in range(value.bit_length()) if value >> i & 1]


def gather_records(records: list[dict], dedupe: bool = True) -> list[dict]:
    """All ranks' records on every rank, in row order. ``DistributedSampler`` pads the last batch by repeating
    rows, so rows are keyed by their own ``uid`` (not ``question_id``: MME shares one per image) and kept once."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    if not dedupe:
        return records
    unique = {}
    for r in records:
        unique.setdefault(r["uid"], r)
    return sorted(unique.values(), key=lambda r: (len(r["uid"]), r["uid"]))


def summarise(records: list[dict], benchmark: Benchmark) -> dict:
    scored = [r for r in records if not r["skipped"]]
    skipped = [r for r in records if r["skipped"]]
    out: dict = {
        "benchmark": benchmark.name,
        "counts": {"samples": len(records), "scored": len(scored), "skipped": len(skipped)},
        "skipped": [{"uid": r["uid"], "question_id": r["question_id"], "error": r["error"]} for r in skipped],
    }
    out["metrics"] = benchmark.aggregate(scored) if scored else {}
    if scored:
        out["tokens"] = {k: mean(r[k] for r in scored) for k in ("n_vanilla", "n_in", "n_final", "n_avg", "n_avg_out")}
        out["efficiency"] = _efficiency(scored)
        if "agrees_with_vanilla" in scored[0]:
            out["fidelity"] = {"answer_agreement": mean(float(r["agrees_with_vanilla"]) for r in scored),
                               "first_token_kl": mean(r["first_token_kl"] for r in scored)}
    else:
        out["efficiency"] = {}
    return out


def _efficiency(scored: list[dict]) -> dict:
    batches = {}
    for r in scored:
        batches.setdefault(r["batch"], r)
    timed = [b for b in batches.values() if not b["warmup"]]
    includes_warmup = not timed
    timed = timed or list(batches.values())  # too few batches to drop the warm-up: say so
    prefill = np.array([b["prefill_ms"] for b in timed])
    decode_tokens = sum(b["batch_size"] * max(b["new_tokens"] - 1, 0) for b in timed)
    decode_s = sum(b["decode_ms"] for b in timed) / 1e3
    out = {
        "prefill_ms_median": float(np.median(prefill)),
        "prefill_ms_p90": float(np.percentile(prefill, 90)),
        "vision_ms_median": float(np.median([b["vision_ms"] for b in timed])),
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else float("nan"),
        "timed_batches": len(timed),
        "latency_includes_warmup": includes_warmup,
        "tflops": mean(r["tflops"] for r in scored),
        "tflops_fastv": mean(r["tflops_fastv"] for r in scored),
        "tflops_vanilla": mean(r["tflops_vanilla"] for r in scored),
        "tflops_fastv_vanilla": mean(r["tflops_fastv_vanilla"] for r in scored),
    }
    out["flops_ratio"] = out["tflops"] / out["tflops_vanilla"] if out["tflops_vanilla"] else float("nan")
    out["flops_ratio_fastv"] = (out["tflops_fastv"] / out["tflops_fastv_vanilla"]
                                if out["tflops_fastv_vanilla"] else float("nan"))
    return out

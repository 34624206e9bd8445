"""PruningEvalModule: a LightningModule whose ``test_step`` answers benchmark questions with a strategy attached.

Per sample it records the prediction, the reference and its score, the visual-token counts under the
three conventions, the batch's prefill latency, the sample's analytic FLOPs (pruned and unpruned) and
which patches survived (``kept``, and ``kept_after`` each cut: hex bitmasks over the sample's visual span).
With ``fidelity=True`` it also generates without the strategy and records agreement with that answer
and the KL divergence of the first-token distributions (what a random-weight model can be judged on).
At epoch end the records of all ranks are gathered and de-duplicated by row id, so ``trainer=ddp``
reports exactly the metrics of one device.
"""
from __future__ import annotations

import resource
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from ..adapters import adapter_for
from ..flops import FlopsModel, trace_flops
from ..registry import build_strategy
from ..runtime import attach
from .benchmarks import get_benchmark
from .data import Sample
from .prompting import chat_inputs, cut_at_stops
from ..loading import load_model
from .records import encode_positions, gather_records, summarise
from ..timing import PrefillTimer


class PruningEvalModule(L.LightningModule):
    def __init__(self, model_path: str | None, strategy: dict[str, Any], benchmark: str, dtype: str = "float32",
                 attn_implementation: str = "sdpa", max_new_tokens: int | None = None, fidelity: bool = False,
                 warmup_batches: int = 1):
        super().__init__()
        self.benchmark = get_benchmark(benchmark)
        self.strategy = build_strategy(strategy)  # bad names and knobs fail here, before the model loads
        self.model, self.processor = load_model(model_path, dtype, attn_implementation)
        self.adapter = adapter_for(self.model)
        self.flops = FlopsModel.from_model(self.model)
        self.removes_tokens = self.strategy.params().get("removes_tokens", True)
        self.max_new_tokens = max_new_tokens or self.benchmark.max_new_tokens
        self.fidelity = fidelity
        self.warmup_batches = warmup_batches
        self.records: list[dict] = []
        self.results: dict | None = None  # metrics of the finished epoch (same on every rank)

    # --- one batch ------------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self.records = []
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def test_step(self, batch: list[Sample], batch_idx: int) -> None:
        usable = [s for s in batch if s.usable]
        for s in batch:
            if not s.usable:
                self.records.append(self._base_record(s) | {"skipped": True, "error": s.error or "no image"})
        if not usable:
            return
        prompts = [self.benchmark.prompt(s.question, s.extra) for s in usable]
        inputs = self._inputs(usable, prompts)
        vanilla = self._generate(inputs) if self.fidelity else None
        with attach(self.model, self.strategy, processor=self.processor) as handle, handle.instructions(prompts):
            pruned = self._generate(inputs)
        trace = handle.trace
        timing = pruned["timing"]
        text_tokens = (inputs["attention_mask"].sum(1) - torch.tensor(trace.n_vanilla, device=self.device)).tolist()
        for b, s in enumerate(usable):
            prediction = pruned["texts"][b]
            full = trace_flops(self.flops, trace, b, text_tokens[b], unpruned=True)
            # a mask-only variant (FastV's evaluation path) still computes every token: no FLOPs saved
            flops = trace_flops(self.flops, trace, b, text_tokens[b]) if self.removes_tokens else full
            record = self._base_record(s) | {
                "skipped": False,
                "prompt": prompts[b],
                "prediction": prediction,
                "score": self.benchmark.score(prediction, s.answer),
                "n_vanilla": trace.n_vanilla[b], "n_in": trace.n_in[b], "n_final": trace.n_final[b],
                "n_avg": trace.n_avg[b],
                "n_avg_out": trace.n_avg_out[b],
                "text_tokens": text_tokens[b],
                "batch": f"{self.global_rank}:{batch_idx}", "batch_size": len(usable),
                "warmup": batch_idx < self.warmup_batches,
                "prefill_ms": timing.prefill_ms, "vision_ms": timing.vision_ms, "decode_ms": timing.decode_ms,
                "new_tokens": pruned["steps"],
                "tflops_fastv": flops["fastv"] / 1e12, "tflops": flops["exact"] / 1e12,
                "tflops_fastv_vanilla": full["fastv"] / 1e12, "tflops_vanilla": full["exact"] / 1e12,
                # which patches survived (span positions, hex bitmasks): at the end, and after each cut (overlays)
                "kept": encode_positions(trace.kept_positions(b).tolist()),
                "kept_after": {ev.site: encode_positions(ev.kept[b].tolist())
                               for ev in trace.events if ev.kept is not None},
            }
            if vanilla is not None:
                kl = F.kl_div(pruned["first_logits"][b].log_softmax(-1), vanilla["first_logits"][b].log_softmax(-1),
                              log_target=True, reduction="sum")
                record |= {"vanilla_prediction": vanilla["texts"][b],
                           "agrees_with_vanilla": prediction == vanilla["texts"][b],
                           "first_token_kl": kl.item()}
            self.records.append(record)

    def _base_record(self, s: Sample) -> dict:
        answer = s.answer if isinstance(s.answer, str) else list(s.answer)
        return {"uid": s.uid, "question_id": s.question_id, "category": s.category, "question": s.question,
                "answer": answer} | {k: s.extra.get(k) for k in self.benchmark.record_fields}

    def _inputs(self, samples: list[Sample], prompts: list[str]):
        videos = [s.video for s in samples] if any(s.video is not None for s in samples) else None
        return chat_inputs(self.processor, [s.visuals() for s in samples], prompts, self.device, self.model.dtype,
                           videos=videos)

    def _generate(self, inputs) -> dict:
        timer = PrefillTimer(self.model, self.adapter.vision_tower)
        with timer:
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                                      output_logits=True, return_dict_in_generate=True)
        new = out.sequences[:, inputs["input_ids"].shape[1]:]
        texts = [cut_at_stops(t, self.benchmark.stop) for t in self.processor.batch_decode(new, skip_special_tokens=True)]
        return {"texts": texts, "first_logits": out.logits[0].float(), "timing": timer.result,
                "steps": new.shape[1]}

    # --- epoch end ------------------------------------------------------------------------------------
    def on_test_epoch_end(self) -> None:
        records = gather_records(self.records)
        peak = (torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        peaks = gather_records([{"peak": peak}], dedupe=False)
        self.results = summarise(records, self.benchmark)
        self.results["efficiency"]["peak_memory_mb"] = max(p["peak"] for p in peaks)
        self.results["efficiency"]["peak_memory_kind"] = ("cuda max_memory_allocated" if self.device.type == "cuda"
                                                          else "process max RSS")
        self.records = records
        self.log_dict(_loggable(self.results), rank_zero_only=True, batch_size=1)

    def configure_optimizers(self):  # evaluation only
        return None


def _loggable(results: dict) -> dict[str, float]:
    """Flat ``group/name`` scalars for the Lightning loggers (nested dicts, e.g. MME categories, flattened)."""
    out = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = float(value)

    for group in ("metrics", "tokens", "efficiency", "fidelity", "counts"):
        walk(group, results.get(group, {}))
    return out

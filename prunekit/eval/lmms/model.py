"""``PrunekitLMM``: any prunekit strategy on any supported family, as an lmms-eval "simple" model.

Model args (``--model_args k=v,...``; lmms-eval passes ``batch_size`` and ``device`` itself):

- ``pretrained``: a name from configs/model (``tiny``, ``tiny_576``, ``pocket``, ``llava15_7b``, ...: its path,
  dtype, attention backend, default budget and CLIP text encoder), an embedded model name (``tiny-next``), a local
  directory or a hub id. The family comes from the checkpoint's config.
- ``strategy`` (default ``keep_all``: the unpruned model, with prunekit's token accounting), ``budget``, and any
  knob of the strategy (``relay=mean_query``); a knob the strategy lacks is refused with the list of its knobs.
- ``dtype``, ``attn_implementation``: override the model config's.
- ``stats_path``: append one JSON line per sample (``doc_id``, ``task``, ``n_in``, ``n_final``, ``n_avg``,
  ``prefill_ms``, ...); unset, ``$PRUNEKIT_LMMS_STATS`` names the file.
- ``max_frames_num`` (default 32, as lmms-eval's LLaVA-OneVision and Qwen-VL models): frames sampled uniformly from a
  video task's file (``doc_to_visual`` gives its path), decoded with PyAV (``.[video]``) as prunekit's evaluator does.

Requests are answered as prunekit's own evaluator answers them (``prompting``: the images first, then the
context, under the processor's chat template; greedy unless the task asks to sample; the text cut at the task's
``until``). ``loglikelihood`` returns lmms-eval's loss convention (the mean negative log-likelihood). Each answer
and score carries lmms-eval's ``TokenCounts`` with prunekit's counts added under ``"prunekit"``, which lmms-eval
writes into each logged sample's ``token_counts``; means go into the ``throughput`` summary of lmms-eval's
results.json (and so into its W&B artifact), and into the W&B run's summary when one is active.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from omegaconf import OmegaConf

from ... import compat
from ...adapters import adapter_for
from ...errors import PruningError
from ...loading import TINY, load_model
from ...registry import build_strategy
from ...runtime import attach
from ...timing import PrefillTimer
from ..cli import CONFIG_DIR, strategy_node
from ..prompting import chat_inputs, chat_text, cut_at_stops
from ..records import encode_positions
from ..run import RANDOM_WEIGHTS_NOTE, strategy_config

log = logging.getLogger("prunekit")
STATS_ENV = "PRUNEKIT_LMMS_STATS"
OWN_ARGS = ("pretrained", "strategy", "budget", "dtype", "attn_implementation", "device", "batch_size", "stats_path",
            "max_frames_num")
MEANS = ("n_vanilla", "n_in", "n_final", "n_avg", "prefill_ms")  # averaged over the answered samples
DEFAULT_MAX_NEW_TOKENS = 1024  # lmms-eval's Hugging Face models, for a task that sets none


def model_settings(pretrained: str) -> dict:
    """A configs/model name's settings, else ``pretrained`` as a path or hub id with the defaults."""
    path = CONFIG_DIR / "model" / f"{pretrained}.yaml"
    if "/" not in pretrained and path.exists():
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]
    return {"name": pretrained, "path": pretrained, "dtype": None, "attn_implementation": "sdpa",
            "random_weights": pretrained in TINY, "default_budget": None}


def strategy_settings(name: str, knobs: dict, model: dict, budget) -> dict:
    """The strategy's config as ablate.py composes it: its YAML (or constructor defaults), the knobs given, the
    budget (else the model config's default) and checkpoint knobs resolved (CDPruner's ``text_encoder``)."""
    node = strategy_node(name)
    unknown = sorted(set(knobs) - set(node))
    if unknown:
        raise ValueError(f"strategy {name!r} has no knob {', '.join(map(repr, unknown))}; its knobs: "
                         f"{', '.join(k for k in node if k != 'name')}. The model's own args: {', '.join(OWN_ARGS)}.")
    budget = model.get("default_budget") if budget is None else budget
    return strategy_config(OmegaConf.create({"strategy": node | knobs, "model": model, "budget": budget}))


@dataclass
class PrunedTokenCounts(TokenCounts):
    """lmms-eval's per-request token counters, plus prunekit's record of the sample (``to_dict`` is what it logs)."""

    prunekit: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return super().to_dict() | {"prunekit": self.prunekit}


def _device(device: str | None) -> torch.device:
    if device in (None, "", "cuda"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class PrunekitLMM(lmms):
    is_simple = True

    def __init__(self, pretrained: str = "tiny", strategy: str = "keep_all", budget: int | None = None,
                 dtype: str | None = None, attn_implementation: str | None = None, device: str | None = None,
                 batch_size: int | str = 1, stats_path: str | None = None, max_frames_num: int = 32,
                 max_batch_size=None, **knobs):
        # max_batch_size: lmms-eval passes it for batch_size=auto, which is refused below
        super().__init__()
        settings = model_settings(str(pretrained))
        self.strategy = build_strategy(strategy_settings(strategy, knobs, settings, budget))  # before the model loads
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise NotImplementedError(
                "prunekit's lmms-eval model runs in one process. For several GPUs, run one lmms-eval per GPU on a "
                "shard (--limit / --offset), or prunekit's own evaluator with trainer=ddp (docs/lmms_eval.md).")
        self._device = _device(device)
        dtype = dtype or settings.get("dtype") or ("bfloat16" if self._device.type == "cuda" else "float32")
        self.model, self.processor = load_model(settings.get("path"), dtype,
                                                attn_implementation or settings.get("attn_implementation") or "sdpa")
        self.model.to(self._device)
        self.vision_tower = adapter_for(self.model).vision_tower
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size=auto is not supported by prunekit's model; give a number (--batch_size 8)")
        self.batch_size = int(batch_size)
        stats_path = stats_path or os.environ.get(STATS_ENV)
        self.stats_path = Path(stats_path) if stats_path else None
        self.image_token = getattr(self.processor, "image_token", None)
        self.video_token = getattr(self.processor, "video_token", None)
        self.max_frames_num = int(max_frames_num)
        self._totals: dict[str, float] = {}  # sums over the run, for the W&B summary
        if settings.get("random_weights"):
            log.warning(RANDOM_WEIGHTS_NOTE)

    # --- generate_until -------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        answers: list[GenerationResult | None] = [None] * len(requests)
        stats = []
        for batch in self._batches(requests, by_generation=True):
            gen = batch[0][1].args[1]
            batch, contexts, images, videos, skipped = self._readable(batch)
            for i, record in skipped:
                answers[i] = GenerationResult("", PrunedTokenCounts(prunekit=record))
                stats.append(record)
            if not batch:
                continue
            inputs = chat_inputs(self.processor, images, contexts, self._device, self.model.dtype, videos=videos)
            timer = PrefillTimer(self.model, self.vision_tower)
            with attach(self.model, self.strategy, processor=self.processor) as handle, \
                    handle.instructions(contexts), timer:
                sequences = self.model.generate(**inputs, **self._decoding(gen))
            new = sequences[:, inputs["input_ids"].shape[1]:]
            texts = self.processor.batch_decode(new, skip_special_tokens=True)
            lengths = compat.generated_lengths(self.model, new)
            until = gen.get("until") or []
            prompt_tokens = inputs["attention_mask"].sum(1).tolist()
            for b, (i, request) in enumerate(batch):
                record = self._record(request, handle.trace, b, timer.result, len(batch))
                record["new_tokens"] = lengths[b]
                counts = PrunedTokenCounts(input_tokens=prompt_tokens[b], output_tokens=record["new_tokens"],
                                           prunekit=record)
                answers[i] = GenerationResult(cut_at_stops(texts[b], [until] if isinstance(until, str) else until),
                                              counts)
                stats.append(record)
        self._report(stats)
        return answers  # type: ignore[return-value]

    def _decoding(self, gen: dict) -> dict:
        """The task's generation kwargs as ``generate`` takes them: greedy unless it asks to sample."""
        temperature = float(gen.get("temperature") or 0)
        sample = bool(gen.get("do_sample")) or temperature > 0
        settings = {"max_new_tokens": int(gen.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), "do_sample": sample,
                    "num_beams": int(gen.get("num_beams") or 1)}  # beams: the runtime refuses them, saying why
        if sample:
            settings |= {"temperature": temperature or 1.0, "top_p": gen.get("top_p") or 1.0}
        return settings

    # --- loglikelihood --------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request ``(loss, is_greedy)``: the mean negative log-likelihood of the continuation's tokens given the
        context and images, as lmms-eval's own models return it (its multiple-choice scoring takes the argmin),
        and whether greedy decoding gives the continuation.

        The strategy prunes on the context alone: the continuation is fed as teacher-forced decode steps after
        the prefill (``compat.continuation_logits``), so it cannot change which visual tokens are kept."""
        results: list[GenerationResult | None] = [None] * len(requests)
        stats = []
        tokenizer = self.processor.tokenizer
        for batch in self._batches(requests, by_generation=False):
            batch, contexts, images, videos, skipped = self._readable(batch)
            for i, record in skipped:
                results[i] = GenerationResult((float("inf"), False), PrunedTokenCounts(prunekit=record))
                stats.append(record)
            if not batch:
                continue
            inputs = chat_inputs(self.processor, images, contexts, self._device, self.model.dtype, videos=videos)
            continuations = [self._continuation_ids(tokenizer, chat_text(self.processor, len(row), context,
                                                                         n_videos=int(video is not None)),
                                                    self._continuation(r))
                             for row, context, video, (_, r) in zip(images, contexts, videos, batch)]
            longest = max(len(c) for c in continuations)
            forced = torch.tensor([c + [c[-1]] * (longest - len(c)) for c in continuations], device=self._device)
            timer = PrefillTimer(self.model, self.vision_tower)
            with attach(self.model, self.strategy, processor=self.processor) as handle, \
                    handle.instructions(contexts), timer:
                logits = compat.continuation_logits(self.model, inputs, forced)
            logprobs = logits.float().log_softmax(-1)
            prompt_tokens = inputs["attention_mask"].sum(1).tolist()
            for b, (i, request) in enumerate(batch):
                n = len(continuations[b])
                target = forced[b, :n]
                loss = -logprobs[b, torch.arange(n), target].mean().item()
                record = self._record(request, handle.trace, b, timer.result, len(batch)) | {"new_tokens": 0}
                counts = PrunedTokenCounts(input_tokens=prompt_tokens[b] + n, output_tokens=0, prunekit=record)
                results[i] = GenerationResult((loss, bool((logits[b, :n].argmax(-1) == target).all())), counts)
                stats.append(record)
        self._report(stats)
        return results  # type: ignore[return-value]

    def _continuation(self, request: Instance) -> str:
        target = request.args[1]
        if not isinstance(target, str):
            doc = self.task_dict[request.args[4]][request.args[5]][request.args[3]]
            target = target(doc)
        if isinstance(target, list):
            target = target[0]
        return str(target)

    @staticmethod
    def _continuation_ids(tokenizer, prompt: str, continuation: str) -> list[int]:
        """The continuation's tokens as they follow the prompt (the whole tokenized, minus the prompt's tokens)."""
        head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        whole = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
        tail = whole[len(head):] if whole[:len(head)] == head else tokenizer(continuation, add_special_tokens=False)[
            "input_ids"]
        if not tail:
            raise ValueError(f"the continuation {continuation!r} tokenizes to nothing; loglikelihood needs a token")
        return tail

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "prunekit's lmms-eval model does not run multi-round tasks: each round would continue a pruned KV cache "
            "with a whole new turn, which the runtime refuses. Run single-round tasks (generate_until, loglikelihood)."
        )

    # --- shared -----------------------------------------------------------------------------------------
    def _batches(self, requests: list[Instance], *, by_generation: bool):
        """Batches of ``(index, request)`` in request order, one task (and generation setting) per batch."""
        groups: dict[str, list] = defaultdict(list)
        for i, r in enumerate(requests):
            key = r.args[4]  # the task, in both request kinds' arguments
            if by_generation:
                key = f"{key}|{json.dumps(r.args[1], sort_keys=True, default=str)}"
            groups[key].append((i, r))
        for group in groups.values():
            for start in range(0, len(group), self.batch_size):
                yield group[start:start + self.batch_size]

    def _readable(self, batch: list):
        """``batch`` split into the requests whose visuals decode (with their contexts, RGB images and video) and the
        others, ``(index, record)``: a corrupt image or video is skipped and counted, never the end of the run.
        lmms-eval still scores a skipped request (an empty answer, log-probability -inf), as wrong. A visual given as
        a path is a video file: ``max_frames_num`` frames sampled uniformly (``prunekit.eval.video``)."""
        readable, contexts, images, videos, skipped = [], [], [], [], []
        for i, r in batch:
            doc_to_visual, doc_id, task, split = r.args[2], r.args[3], r.args[4], r.args[5]
            doc = self.task_dict[task][split][doc_id]
            try:
                visuals = doc_to_visual(doc) or []
                visuals = [visuals] if isinstance(visuals, (str, os.PathLike)) else visuals  # one path, not a list
                visuals = [v for item in visuals for v in (item if isinstance(item, list) else [item])]
                paths = [v for v in visuals if isinstance(v, (str, os.PathLike))]
                if len(paths) > 1 or (paths and len(paths) != len(visuals)):
                    raise NotImplementedError(f"task {task!r} gives {len(paths)} videos and {len(visuals) - len(paths)} "
                                              "images per question; prunekit's lmms-eval model takes images or one video")
                video = self._video(paths[0]) if paths else None
                rgb = [] if paths else [v.convert("RGB") for v in visuals]
            except (OSError, ValueError, AttributeError, SyntaxError) as error:  # PIL's (and PyAV's) ways to fail
                log.warning("skipping doc %s of %s: its visual cannot be read (%s)", doc_id, task, error)
                skipped.append((i, {"doc_id": doc_id, "task": task, "skipped": True, "error": repr(error)}))
                continue
            context = r.args[0]
            for token in (self.image_token, self.video_token):  # the template places the visuals itself
                if token and token in context:
                    context = context.replace(token, "").strip()
            readable.append((i, r))
            contexts.append(context)
            images.append(rgb)
            videos.append(video)
        if len(batch) > 1 and not readable:  # a whole batch unreadable is a wrong task or layout, not bad luck
            raise PruningError(f"no visual of this batch of {len(batch)} requests could be read, e.g. "
                               f"{skipped[0][1]['error']}; check the task's doc_to_visual against the dataset")
        return readable, contexts, images, videos, skipped

    def _video(self, path):
        from ..video import read_video

        video, error = read_video(path, self.max_frames_num)
        if video is None:
            raise OSError(error)
        return video

    def _record(self, request: Instance, trace, row: int, timing, batch_size: int) -> dict:
        """One sample's token counts (n_in / n_final / n_avg, docs/evaluation.md) and its batch's timings."""
        return {"doc_id": request.doc_id, "task": request.task_name, "n_vanilla": trace.n_vanilla[row],
                "n_in": trace.n_in[row], "n_final": trace.n_final[row], "n_avg": trace.n_avg[row],
                "prefill_ms": timing.prefill_ms, "call_ms": timing.prefill_ms + timing.decode_ms,
                "batch_size": batch_size,
                "kept": encode_positions(trace.kept_positions(row).tolist())}

    def _report(self, records: list[dict]) -> None:
        """The per-sample file; the call's means into lmms-eval's throughput summary (lmms-eval makes one call per
        request type); the run's means so far into the active W&B run's summary."""
        if self.stats_path is not None and records:
            self.stats_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.stats_path, "a") as f:
                for record in records:
                    f.write(json.dumps(record) + "\n")
        answered = [r for r in records if not r.get("skipped")]
        if not records:
            return
        means = {f"prunekit_{k}": sum(s[k] for s in answered) / len(answered) for k in MEANS} if answered else {}
        seconds = sum(s["call_ms"] / s["batch_size"] for s in answered) / 1e3  # each batch's call counted once
        tokens = sum(s["new_tokens"] for s in answered)
        log_metrics(total_elapsed_time=seconds, total_gen_tokens=tokens, avg_speed=tokens / seconds if seconds else 0.0,
                    additional_metrics={**means, "prunekit_samples": len(answered),
                                        "prunekit_skipped": len(records) - len(answered)})
        for s in answered:
            for k in MEANS:
                self._totals[k] = self._totals.get(k, 0.0) + s[k]
        self._totals["samples"] = self._totals.get("samples", 0) + len(answered)
        self._totals["skipped"] = self._totals.get("skipped", 0) + len(records) - len(answered)
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None and self._totals["samples"]:
            n = self._totals["samples"]
            wandb.run.summary.update({f"prunekit/{k}": self._totals[k] / n for k in MEANS}
                                     | {"prunekit/samples": n, "prunekit/skipped": self._totals["skipped"]})

"""Six lmms-eval tasks (MUIRBench with several images per question, Video-MME with a video), and prunekit's pocket
VQA, as prunekit runs them: prompt, generation length, per-sample score, aggregate.

Prompts and generation settings follow lmms-eval's task YAMLs for LLaVA (docs/evaluation.md); the
metrics are in ``metrics.py``. A benchmark sees finished records (dicts with ``prediction``, ``answer``,
``question_id``, ``category``, and the sample columns a benchmark names in ``record_fields``) and never the model.
"""
from __future__ import annotations

from typing import ClassVar

from . import metrics

POST_PROMPT = "\nAnswer the question using a single word or phrase."


class Benchmark:
    name: ClassVar[str]
    max_new_tokens: ClassVar[int]
    # the answer is cut at these (lmms-eval's ``until``: the task's, else its default, the few-shot delimiter "\n\n")
    stop: ClassVar[tuple[str, ...]] = ("\n\n",)
    # sample columns (``Sample.extra``) copied into each record, for ``aggregate`` (Video-MME: duration, domain)
    record_fields: ClassVar[tuple[str, ...]] = ()

    def prompt(self, question: str, extra: dict | None = None) -> str:
        """The prompt text; ``extra``: the sample's other columns (MUIRBench's options)."""
        return question.strip() + POST_PROMPT

    def score(self, prediction: str, answer) -> float:
        raise NotImplementedError

    def aggregate(self, records: list[dict]) -> dict:
        """Benchmark metrics over scored records; GQA and TextVQA: the mean score (lmms-eval's ``exact_match``)."""
        return {"accuracy": metrics.mean(r["score"] for r in records)}


class Pope(Benchmark):
    name = "pope"
    max_new_tokens = 128

    def score(self, prediction, answer):
        return metrics.pope_score(prediction, answer)

    def aggregate(self, records):
        return metrics.pope_metrics([r["prediction"] for r in records], [r["answer"] for r in records])


class MME(Benchmark):
    name = "mme"
    max_new_tokens = 16

    def prompt(self, question, extra=None):
        return question.strip().replace(" Please answer yes or no.", "") + POST_PROMPT

    def score(self, prediction, answer):
        return float(metrics.mme_parse(prediction) == answer.lower().strip().replace(".", ""))

    def aggregate(self, records):
        return metrics.mme_metrics(records)


class GQA(Benchmark):
    name = "gqa"
    max_new_tokens = 16

    def prompt(self, question, extra=None):
        return question + POST_PROMPT  # lmms-eval does not strip GQA questions

    def score(self, prediction, answer):
        return metrics.gqa_exact_match(prediction, answer)


class TextVQA(Benchmark):
    name = "textvqa"
    max_new_tokens = 32  # lmms-eval sets only ``until``; answers are single words or phrases
    stop = ("ASSISTANT:",)  # the task's own ``until``, which replaces the default

    def prompt(self, question, extra=None):
        return question.capitalize() + POST_PROMPT

    def score(self, prediction, answer):
        return metrics.textvqa_accuracy(prediction, list(answer))


class Pocket(Benchmark):
    """prunekit's generated grounded VQA (docs/pocket.md): one-word answers, accuracy overall and per type."""
    name = "pocket"
    max_new_tokens = 4

    def score(self, prediction, answer):
        return metrics.pocket_score(prediction, answer)

    def aggregate(self, records):
        return metrics.pocket_metrics(records)


class MUIRBench(Benchmark):
    """Multi-image multiple choice (lmms-eval's ``muirbench``): the options lettered under the question, the letter
    read off the answer (``A. ...`` or ``A``), accuracy overall and per task."""
    name = "muirbench"
    max_new_tokens = 16

    def prompt(self, question, extra=None):
        options = "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate((extra or {}).get("options") or []))
        return f"{question}\n{options}\nAnswer with the option's letter from the given choices directly."

    def score(self, prediction, answer):
        return metrics.muirbench_score(prediction, answer)

    def aggregate(self, records):
        return metrics.accuracy_by_category(records)


VIDEOMME_OPTION_PROMPT = ("Select the best answer to the following multiple-choice question based on the video and the "
                          "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
VIDEOMME_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."


class VideoMME(Benchmark):
    """Video multiple choice (lmms-eval's ``videomme``, no subtitles): ``videomme_doc_to_text`` with the task's default
    post-prompt (tasks/videomme/utils.py @bd51fabc, 153-164; videomme.yaml). Kept as lmms-eval writes them: the option
    prompt mentions subtitles although this task has none, and the post-prompt's own "\n" follows the joining "\n"
    (a blank line before it). The options come lettered ("A. ..."). Score: ``metrics.videomme_score``."""
    name = "videomme"
    max_new_tokens = 16
    record_fields = ("duration", "domain", "sub_category", "videoID")

    def prompt(self, question, extra=None):
        options = "\n".join(str(o) for o in (extra or {}).get("options") or [])
        return f"{VIDEOMME_OPTION_PROMPT}\n{question}\n{options}\n{VIDEOMME_POST_PROMPT}"

    def score(self, prediction, answer):
        return metrics.videomme_score(prediction, answer)

    def aggregate(self, records):
        return metrics.videomme_metrics(records)


BENCHMARKS: dict[str, Benchmark] = {b.name: b() for b in (Pope, MME, GQA, TextVQA, Pocket, MUIRBench, VideoMME)}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]

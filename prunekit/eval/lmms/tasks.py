"""Local lmms-eval tasks over parquet files in the lmms-lab/POPE layout: prunekit's bundled data, offline.

``python -m prunekit.eval.lmms.tasks <dir>`` writes ``<dir>/prunekit_pope.yaml`` (and its ``utils.py``) over the
bundled synthetic POPE; ``--data`` points it at other POPE-layout files (the pocket benchmark's, or a local
copy of lmms-lab/POPE). Then ``lmms-eval --include_path <dir> --tasks prunekit_pope ...``. The task is lmms-eval's
POPE: its ``doc_to_*``, ``process_results`` and aggregations are imported from lmms-eval's own
``tasks.pope.utils``, and its generation settings and post-prompt are copied from lmms-eval's pope.yaml. It only
adds a ``process_docs`` that decodes images stored without Hugging Face feature metadata. The name must differ
from ``pope``: lmms-eval's built-in task of that name would shadow a local one.

``write_pope_task(..., choice=True)`` writes the same questions as a ``multiple_choice`` task (" yes" / " no"
scored by ``loglikelihood``, metric ``acc``): the plugin's scoring path through lmms-eval's harness.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

TASK = "prunekit_pope"
POST_PROMPT = "\\nAnswer the question using a single word or phrase."  # as YAML writes it, escaped

UTILS = '''"""lmms-eval's POPE functions, and the image decoding a parquet without HF feature metadata needs."""
from lmms_eval.tasks.pope.utils import (  # noqa: F401
    pope_aggregate_accuracy, pope_aggregate_f1_score, pope_aggregate_precision, pope_aggregate_recall,
    pope_aggregate_yes_ratio, pope_doc_to_text, pope_doc_to_visual, pope_process_results,
)


def decode_images(dataset):
    """The ``image`` column as HF images ({bytes, path} structs arrive as dicts otherwise)."""
    from datasets import Image

    return dataset.cast_column("image", Image())
'''

METRICS = ("accuracy", "precision", "recall", "f1_score", "yes_ratio")


def write_pope_task(out_dir: str | Path, data_files: list[str | Path], *, task: str = TASK,
                    max_new_tokens: int = 128, choice: bool = False) -> Path:
    """Write the task into the folder for ``--include_path``; returns the YAML's path. ``max_new_tokens`` is
    lmms-eval's POPE setting by default (prunekit's synthetic config answers in 8: one word on a random-weight
    model). ``choice``: a multiple-choice task over the answers "yes" and "no" instead."""
    files = [str(Path(f).resolve()) for f in data_files]
    missing = [f for f in files if not Path(f).exists()]
    if not files or missing:
        raise FileNotFoundError(f"no parquet files to build task {task!r} over: {missing or 'none given'}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = "".join(f"  - metric: pope_{m}\n    aggregation: !function utils.pope_aggregate_{m}\n"
                      f"    higher_is_better: true\n" for m in METRICS)
    if choice:
        scoring = ("output_type: multiple_choice\n"
                   'doc_to_choice: ["yes", "no"]\n'
                   "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    else:
        scoring = ("output_type: generate_until\n"
                   f"generation_kwargs:\n  max_new_tokens: {int(max_new_tokens)}\n  temperature: 0\n  top_p: 1.0\n"
                   "  num_beams: 1\n  do_sample: false\n"
                   "process_results: !function utils.pope_process_results\n"
                   f"metric_list:\n{metrics}")
    yaml = (
        f"task: {task}\n"
        "dataset_path: parquet\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(files)}\n"
        "test_split: test\n"
        "process_docs: !function utils.decode_images\n"
        "doc_to_visual: !function utils.pope_doc_to_visual\n"
        "doc_to_text: !function utils.pope_doc_to_text\n"
        'doc_to_target: "answer"\n'
        f"{scoring}"
        f'lmms_eval_specific_kwargs:\n  default:\n    pre_prompt: ""\n    post_prompt: "{POST_PROMPT}"\n'
        "metadata:\n  - version: 0.0\n"
    )
    (out / "utils.py").write_text(UTILS)
    path = out / f"{task}.yaml"
    path.write_text(yaml)
    return path


def main(argv: list[str] | None = None) -> None:
    from ..data import SYNTHETIC_FILE, synthetic_pope_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--data", nargs="*", help="POPE-layout parquet files (default: the bundled synthetic POPE)")
    parser.add_argument("--task", default=TASK)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--choice", action="store_true", help="a multiple-choice task (loglikelihood) instead")
    args = parser.parse_args(argv)
    files = args.data or [synthetic_pope_dir() / SYNTHETIC_FILE]
    print(write_pope_task(args.out_dir, files, task=args.task, max_new_tokens=args.max_new_tokens,
                          choice=args.choice))


if __name__ == "__main__":
    main()

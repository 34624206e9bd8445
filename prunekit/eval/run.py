"""One evaluation run from a composed config: data, model + strategy, Lightning ``test``, results on disk.

The run directory receives ``config.yaml`` (resolved), ``predictions.jsonl`` (one record per row) and
``metrics.json`` (benchmark metrics, token accounting, efficiency, fidelity, skipped samples and
provenance). ``metrics.json`` is written last, with ``complete: true``: a directory holding it is a
finished run, which a re-run skips and never overwrites.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .. import compat
from ..loading import resolve_model_path
from ..registry import load_plugins
from .cli import fingerprint

log = logging.getLogger("prunekit")
RANDOM_WEIGHTS_NOTE = ("NOTE: this model has random weights, so its accuracy means nothing. Judge the strategy by its "
                       "fidelity to the unpruned model: answer agreement and first-token KL (fidelity/*).")


def _complete_metrics(output_dir: Path) -> dict | None:
    path = output_dir / "metrics.json"
    if path.exists():
        try:
            metrics = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        if metrics.get("complete"):
            return metrics
    return None


def library_versions() -> dict[str, str]:
    """The versions that can change a run's results besides its config."""
    import transformers

    from .. import __version__

    return {"prunekit": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def run_problem(output_dir: Path, metrics: dict) -> str | None:
    """Why a run marked complete cannot stand for its config today, or None: made with other library versions,
    a predictions file that does not hold every sample, or no visual tokens at all on an image benchmark."""
    made = metrics.get("provenance", {})
    changed = [f"{k} {made.get(k, '?')} -> {v}" for k, v in library_versions().items() if made.get(k) != v]
    if changed:
        return "made with other library versions (" + ", ".join(changed) + ")"
    expected = metrics.get("counts", {}).get("samples")
    lines = _prediction_lines(output_dir / "predictions.jsonl")
    if expected is None or lines != expected:
        return f"predictions.jsonl holds {lines} readable records of {expected} samples (truncated or missing)"
    if no_visual_tokens(metrics):
        return "no visual token reached the language model in any sample (n_in = 0): pruning never ran"
    return None


def no_visual_tokens(results: dict) -> bool:
    tokens = results.get("tokens")
    return bool(results.get("counts", {}).get("scored")) and tokens is not None and tokens.get("n_vanilla", 0) > 0 \
        and tokens.get("n_in", 0) == 0


def _prediction_lines(path: Path) -> int:
    if not path.exists():
        return 0
    count = 0
    for line in path.read_text().splitlines():
        try:
            json.loads(line)
            count += 1
        except json.JSONDecodeError:
            pass
    return count


def supersede(output_dir: Path, reason: str) -> Path:
    """Move a run's files into ``superseded/<time>/`` (kept, never deleted) so the job can run again."""
    target = output_dir / "superseded" / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.json", "predictions.jsonl", "config.yaml", "csv"):
        if (output_dir / name).exists():
            (output_dir / name).rename(target / name)
    (target / "REASON").write_text(reason + "\n")
    return target


CHECKPOINT_KNOBS = ("text_encoder",)  # strategy knobs that name an auxiliary checkpoint (CDPruner's CLIP text encoder)


def strategy_config(cfg: DictConfig) -> dict:
    """The strategy's knobs, with the top-level ``budget=`` applied and checkpoint knobs resolved like
    ``model.path`` (an embedded name such as ``tiny-clip-text``, a local directory or a hub id)."""
    strategy = OmegaConf.to_container(cfg.strategy, resolve=True)
    for knob in CHECKPOINT_KNOBS:
        if isinstance(strategy.get(knob), str):
            strategy[knob] = resolve_model_path(strategy[knob])
    if cfg.get("budget") is not None:
        if "budget" in strategy:
            strategy["budget"] = cfg.budget
        else:
            log.warning("strategy %r has no budget knob: budget=%s does not apply to it", strategy["name"], cfg.budget)
    return strategy


def evaluate(cfg: DictConfig, output_dir: str | os.PathLike) -> dict:
    """Run the evaluation described by ``cfg`` (the composed ablate config) and return its metrics."""
    import lightning as L

    from lightning.pytorch.utilities import rank_zero_only

    from .datamodule import BenchmarkDataModule
    from .faults import fault_callbacks
    from .loggers import build_loggers, finish_loggers
    from .module import PruningEvalModule

    load_plugins(cfg.get("plugins") or [])  # again: a launcher may run this job in a fresh process (submitit)
    output_dir = Path(output_dir)
    done = _complete_metrics(output_dir)
    if done is not None:
        problem = run_problem(output_dir, done)
        if problem is None:
            log.info("skipping: %s already holds a complete run (delete it to re-run)", output_dir)
            return done
        if rank_zero_only.rank == 0:  # under Slurm every rank of the job runs this function
            log.warning("re-running %s: its finished run was %s; the old files are kept in %s", output_dir,
                        problem, supersede(output_dir, problem))
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data = BenchmarkDataModule(**{k: v for k, v in data_cfg.items() if k not in ("name", "max_new_tokens")})
    data.setup("test")  # a wrong data.root or missing columns fail here, before a large model loads
    strategy = strategy_config(cfg)
    module = PruningEvalModule(
        model_path=cfg.model.path, strategy=strategy, benchmark=cfg.data.benchmark, dtype=cfg.model.dtype,
        attn_implementation=cfg.model.attn_implementation, max_new_tokens=cfg.data.max_new_tokens,
        fidelity=cfg.fidelity, warmup_batches=cfg.warmup_batches,
    )
    if cfg.model.random_weights:
        log.warning(RANDOM_WEIGHTS_NOTE)
    loggers = build_loggers(cfg, output_dir)
    trainer = L.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), logger=loggers or False,
                        default_root_dir=str(output_dir), callbacks=fault_callbacks(output_dir))
    trainer.test(module, datamodule=data, verbose=False)

    results = module.results | {
        "strategy": module.strategy.params(),
        "model": {"path": str(cfg.model.path or "tiny"), "name": cfg.model.name,
                  "random_weights": bool(cfg.model.random_weights)},
        "provenance": provenance(cfg, module, trainer, started),
        "complete": True,
    }
    if cfg.model.random_weights:
        results["note"] = RANDOM_WEIGHTS_NOTE
    if no_visual_tokens(results):
        raise compat.seam_error("the run scored its samples, but no visual token reached the language model (n_in = 0); "
                                "its results are not written as a finished run")
    if trainer.global_rank == 0:
        write_results(output_dir, cfg, module.records, results)
        finish_loggers(loggers, cfg, module.records, results)
        log.info("results: %s", output_dir)
    return results


def write_results(output_dir: Path, cfg: DictConfig, records: list[dict], results: dict) -> None:
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    with open(output_dir / "predictions.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r, default=str) + "\n")
    tmp = output_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str))
    tmp.replace(output_dir / "metrics.json")  # atomic: a crash never leaves a "complete" half file


def provenance(cfg: DictConfig, module, trainer, started: float) -> dict:
    import lightning

    device = module.device
    return {
        **library_versions(), "git_revision": git_revision(), "lightning": lightning.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()}, "
                                                                                   f"{torch.get_num_threads()} threads)",
        "world_size": trainer.world_size,
        "dtype": str(module.model.dtype).replace("torch.", ""),
        "attn_implementation": compat.attn_implementation(module.model.config),
        "batch_size": cfg.data.batch_size, "seed": cfg.seed,
        "config_fingerprint": fingerprint(cfg),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_s": round(time.time() - started, 2),
    }


def git_revision() -> str:
    """Where the code came from: the checkout's commit (``+dirty`` with uncommitted changes) when prunekit runs
    from a git checkout, else ``prunekit <version> (installed, no checkout)``; never empty."""
    from .. import __version__

    installed = f"prunekit {__version__} (installed, no checkout)"
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return installed
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return installed
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return installed

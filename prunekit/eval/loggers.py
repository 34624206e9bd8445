"""Lightning loggers from the ``logger`` config group: W&B (online with a key, else offline), CSV, or none.

W&B is optional: without the package the run logs to CSV and says how to install it. ``WANDB_MODE=disabled``
(the tests) always wins: Lightning's ``offline=True`` would otherwise override it.
"""
from __future__ import annotations

import importlib.util
import logging
import netrc
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("prunekit")


def wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def build_loggers(cfg: DictConfig, output_dir: Path, name: str | None = None) -> list:
    """The loggers ``cfg.logger`` asks for; ``name`` is the W&B run's (default: strategy-benchmark-budget)."""
    settings = cfg.get("logger") or {}
    loggers = []
    if "csv" in settings:
        loggers.append(_csv(output_dir))
    if "wandb" in settings:
        loggers.append(_wandb(settings.wandb, cfg, output_dir, name))
    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(config)
    return loggers


def _csv(output_dir: Path):
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=str(output_dir), name="csv", version="")  # <run>/csv/metrics.csv


def _wandb(settings: DictConfig, cfg: DictConfig, output_dir: Path, name: str | None):
    from lightning.pytorch.loggers import WandbLogger

    if importlib.util.find_spec("wandb") is None:
        log.warning("wandb is not installed (pip install -e '.[wandb]'); logging to CSV in %s instead", output_dir)
        return _csv(output_dir)
    mode = os.environ.get("WANDB_MODE") or settings.mode
    if mode == "auto":
        mode = "online" if wandb_key_configured() else "offline"
    if name is None:
        name = f"{cfg.strategy.name}-{cfg.data.name}" + (f"-b{cfg.budget}" if cfg.get("budget") is not None else "")
    logger = WandbLogger(project=settings.project, entity=settings.entity, group=settings.group,
                         tags=list(settings.tags or []), name=name, save_dir=str(output_dir),
                         offline=mode in ("offline", "dryrun"))
    if mode in ("offline", "dryrun"):
        run_dir = Path(logger.experiment.dir).parent
        log.warning("W&B: no API key configured, logging offline to %s; upload it later with: wandb sync %s",
                    run_dir, run_dir)
    return logger


def finish_loggers(loggers: list, cfg: DictConfig, records: list[dict], results: dict) -> None:
    """Per-sample table and summary for W&B (the CSV logger already has the scalars); close the run."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        columns = ["uid", "question_id", "category", "question", "answer", "prediction", "score",
                   "n_in", "n_final", "n_avg", "n_avg_out", "prefill_ms", "tflops"]
        if records and "agrees_with_vanilla" in records[0]:
            columns += ["vanilla_prediction", "agrees_with_vanilla", "first_token_kl"]
        rows = [[_cell(r.get(c)) for c in columns] for r in records]
        logger.log_table("predictions", columns=columns, data=rows)
        logger.experiment.summary.update({"skipped": results["counts"]["skipped"],
                                          "strategy": results["strategy"], "provenance": results["provenance"]})
        logger.experiment.finish()


def _cell(value):
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)

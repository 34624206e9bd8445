"""W&B for comparisons: log a study (table, paired tests, charts, plots, overlays); read runs back from a project.

Logging follows the runner's rule (prunekit/eval/loggers.py): online with an API key, else offline into the
output folder (``wandb sync`` later); ``WANDB_MODE`` wins. Reading uses the public ``wandb.Api`` and needs the
network: each finished run's config, its summary scalars (``metrics/*``, ``tokens/*``, ``efficiency/*``,
``fidelity/*``, ``counts/*``, as the runner logs them) and its ``predictions`` table (for CIs and paired tests;
the table has no kept positions, so W&B runs get no overlays).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..eval.loggers import wandb_key_configured
from .collect import Run, Sweep
from .table import Study, columns

log = logging.getLogger("prunekit")
GROUPS = ("metrics", "tokens", "efficiency", "fidelity", "counts")


def log_study(study: Study, images: list[Path], out_dir: Path, project: str = "prunekit", entity: str | None = None,
              name: str | None = None, tokens: str = "n_avg") -> dict:
    """Log the study as one W&B run (job_type ``compare``); returns what was logged, by key."""
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if wandb_key_configured() else "offline")
    run = wandb.init(project=project, entity=entity, name=name, job_type="compare", dir=str(out_dir), mode=mode,
                     config={"datasets": study.datasets, "published": study.published, "tokens": tokens})
    cols = columns(study)
    rows = [[r.model, r.strategy, r.label, r.budget, *[r.values.get(c) for c in cols[4:-1]],
             "; ".join(x.source for x in r.runs.values())] for r in study.rows]
    logged = {"comparison": wandb.Table(columns=cols, data=rows, allow_mixed_types=True)}
    if study.pairs:
        keys = list(study.pairs[0])
        logged["paired_tests"] = wandb.Table(columns=keys, data=[[p[k] for k in keys] for p in study.pairs],
                                             allow_mixed_types=True)
    for model in study.models:
        for ds in study.datasets:
            for metric in (study.headline[ds], "answer_agreement"):
                chart = _line_chart(wandb, study, model, ds, metric, tokens)
                if chart is not None:
                    logged[f"charts/{model}/{ds}/{metric}_vs_{tokens}"] = chart
    for path in images:
        logged[f"{path.parent.name}/{path.stem}"] = wandb.Image(str(path))
    run.log(logged)
    if mode in ("offline", "dryrun"):
        log.warning("W&B: no API key configured, logged offline to %s; upload it later with: wandb sync %s",
                    Path(run.dir).parent, Path(run.dir).parent)
    run.finish()
    return logged


def _line_chart(wandb, study: Study, model: str, ds: str, metric: str, tokens: str):
    """A native W&B line chart: one series per strategy label, x = tokens, y = the metric."""
    series: dict[str, list] = {}
    for row in study.rows_of(model):
        x, y = row.values.get(tokens), row.values.get(f"{ds}/{metric}")
        if x is not None and y is not None:
            series.setdefault(row.label, []).append((x, y))
    if not series:
        return None
    labels = list(series)
    points = [sorted(series[k]) for k in labels]
    return wandb.plot.line_series(xs=[[p[0] for p in s] for s in points], ys=[[p[1] for p in s] for s in points],
                                  keys=labels, title=f"{model} · {ds}: {metric} vs {tokens}", xname=tokens)


# --- reading runs back ------------------------------------------------------------------------------------
def read_wandb(path: str, api=None, filters: dict | None = None) -> Sweep:
    """The runs of W&B project ``entity/project`` as a :class:`Sweep` (``api``: a ``wandb.Api``, or a stand-in)."""
    if api is None:
        import wandb

        api = wandb.Api()
    runs, incomplete, notes = [], [], []
    for wr in api.runs(path, filters=filters or None):
        if getattr(wr, "job_type", None) == "compare":
            continue  # an earlier comparison, not an evaluation run
        config = dict(wr.config)
        summary = _summary(wr.summary)
        run = Run(wr.name, getattr(wr, "url", f"wandb:{path}/{wr.name}"), config, None)
        if wr.state != "finished" or not any(k.startswith("metrics/") for k in summary):
            run.problem = f"W&B run state {wr.state!r}" + ("" if summary else ", no summary")
            incomplete.append(run)
            continue
        run.metrics = _metrics(config, summary)
        try:
            run.records = _records(wr)
        except Exception as e:  # the table is optional: CIs need it, the table row does not
            run.problem = f"predictions table not readable ({type(e).__name__}); no CIs or paired tests"
        if run.records is None and run.problem is None:
            run.problem = "no predictions table: no confidence intervals or paired tests"
        runs.append(run)
    if not runs and not incomplete:
        notes.append(f"no runs found in W&B project {path}")
    return Sweep(runs, incomplete, [], notes, [f"wandb:{path}"])


def _summary(summary) -> dict:
    raw = getattr(summary, "_json_dict", None)
    return dict(raw if isinstance(raw, dict) else summary)


def _metrics(config: dict, summary: dict) -> dict:
    """metrics.json's shape, from the flat ``group/key`` scalars the runner logged."""
    out: dict = {g: {} for g in GROUPS}
    for key, value in summary.items():
        parts = key.split("/")
        if parts[0] in GROUPS and len(parts) > 1:
            node = out[parts[0]]
            for p in parts[1:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
    model, data = config.get("model") or {}, config.get("data") or {}
    out["counts"] = {k: int(v) for k, v in out["counts"].items()}
    if not out["fidelity"]:
        del out["fidelity"]
    return out | {
        "benchmark": data.get("benchmark"),
        "strategy": summary.get("strategy") or config.get("strategy") or {},
        "model": {"name": model.get("name"), "path": model.get("path"),
                  "random_weights": bool(model.get("random_weights"))},
        "complete": True,
    }


def _records(wr) -> list[dict] | None:
    for artifact in wr.logged_artifacts():
        if artifact.type == "run_table" and "predictions" in artifact.name:
            table = artifact.get("predictions")
            records = [dict(zip(table.columns, row)) for row in table.data]
            return [r | {"skipped": r.get("score") is None} for r in records]
    return None

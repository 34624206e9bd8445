"""Read a sweep (or any folder of runs) into :class:`Run` objects: what finished, what did not, what never started.

A run directory is one ``experiments/ablate.py`` job: ``config.yaml``, ``predictions.jsonl`` and, written last,
``metrics.json`` with ``complete: true`` (docs/evaluation.md). A directory holding only Hydra's job log is a job
that was interrupted, failed or is still running. Jobs a sweep asked for but never started are found from
Hydra's ``multirun.yaml`` at the sweep root (its overrides, expanded).
"""
from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# folders inside a run or sweep that are never runs themselves
SKIP_DIRS = {"compare", "wandb", "csv", ".hydra", "__pycache__"}
# overrides that do not say which job it is (or that no run config records)
NOT_IDENTITY = ("hydra", "logger", "output_root", "sweep_name", "plugins", "experiment", "data.root", "model.path")


@dataclass
class Run:
    name: str  # directory name (or W&B run name)
    source: str  # directory path or W&B run URL
    config: dict  # the resolved run config (config.yaml); {} when the run never wrote it
    metrics: dict | None  # metrics.json of a complete run, else None
    records: list[dict] | None = None  # predictions.jsonl rows; None when not available
    problem: str | None = None  # why the run is incomplete, or what is missing from a complete one
    overrides: dict = field(default_factory=dict)  # key -> value read from a sweep job's directory name

    @property
    def complete(self) -> bool:
        return self.metrics is not None

    @property
    def strategy(self) -> str:
        if self.metrics and "strategy" in self.metrics:
            return self.metrics["strategy"]["name"]
        node = self.config.get("strategy")
        return node.get("name", "?") if isinstance(node, dict) else self.overrides.get("strategy", "?")

    @property
    def knobs(self) -> dict:
        """The strategy's knobs as the run built it (metrics.json), without its name."""
        params = (self.metrics or {}).get("strategy") or self.config.get("strategy") or {}
        return {k: v for k, v in params.items() if k != "name"}

    @property
    def budget(self):
        return self.knobs.get("budget") if self.metrics else self.overrides.get("budget", self.config.get("budget"))

    @property
    def model(self) -> str:
        if self.metrics and "model" in self.metrics:
            return self.metrics["model"].get("name") or self.metrics["model"].get("path", "?")
        return (self.config.get("model") or {}).get("name") or self.overrides.get("model", "?")

    @property
    def random_weights(self) -> bool:
        return bool(((self.metrics or {}).get("model") or {}).get("random_weights"))

    @property
    def dataset(self) -> str:
        """The data config's name, with its split when one is set (``pope:adversarial``)."""
        data = self.config.get("data") or {}
        name = data.get("name") or self.overrides.get("data") or (self.metrics or {}).get("benchmark", "?")
        return f"{name}:{data['split']}" if data.get("split") else name

    @property
    def benchmark(self) -> str:
        return (self.metrics or {}).get("benchmark") or (self.config.get("data") or {}).get("benchmark", "?")

    @property
    def scored(self) -> list[dict]:
        return [r for r in self.records or [] if not r.get("skipped")]

    def describe(self) -> str:
        budget = "" if self.budget is None else f" budget={self.budget}"
        where = ", ".join(x for x in (self.model, self.dataset) if x != "?")
        return f"{self.strategy}{budget}" + (f" ({where})" if where else "") + f" [{self.name}]"


@dataclass
class Sweep:
    runs: list[Run]  # complete runs
    incomplete: list[Run]  # started, no complete metrics.json
    missing: list[str]  # jobs the sweep's multirun.yaml asked for that never started
    notes: list[str]
    sources: list[str]
    expected_known: bool = False  # True when multirun.yaml listed the jobs (else gaps are judged from the grid)


def is_run_dir(path: Path) -> bool:
    return any((path / f).exists() for f in ("metrics.json", "config.yaml", "predictions.jsonl")) or any(
        p.suffix == ".log" for p in path.iterdir() if p.is_file())


def run_dirs(root: Path) -> list[Path]:
    """Run directories at or below ``root`` (a run dir, a sweep dir, or ``outputs/`` holding many sweeps)."""
    if is_run_dir(root) and not (root / "multirun.yaml").exists():
        return [root]
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        here = Path(dirpath)
        if here != root and is_run_dir(here):
            found.append(here)
            dirnames[:] = []  # a run's own sub-folders (csv/, wandb/) are not runs
    return found


def read_run(path: Path) -> Run:
    config = _load_yaml(path / "config.yaml") or {}
    run = Run(path.name, str(path), config, None, overrides=dir_overrides(path.name))
    metrics_path = path / "metrics.json"
    if not metrics_path.exists():
        run.problem = "no metrics.json: the job was interrupted, failed or is still running"
        return run
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        run.problem = f"metrics.json unreadable ({type(e).__name__})"
        return run
    if not metrics.get("complete"):
        run.problem = "metrics.json is not marked complete"
        return run
    records, run.problem = _read_records(path / "predictions.jsonl")
    expected = metrics.get("counts", {}).get("samples")
    if records is not None and expected is not None and len(records) != expected:
        run.problem = (f"predictions.jsonl holds {len(records)} of its {expected} samples (truncated): left out, "
                       "so no table row, interval or paired test uses a part of it")
        return run
    run.metrics, run.records = metrics, records
    return run


def _read_records(path: Path) -> tuple[list[dict] | None, str | None]:
    if not path.exists():
        return None, "no predictions.jsonl: no confidence intervals, paired tests or overlays for this run"
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return records, (f"predictions.jsonl: {bad} unreadable line(s) left out" if bad else None)


def _load_yaml(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def dir_overrides(name: str) -> dict[str, str]:
    """``strategy=flowcut,budget=64,data.limit=6-1a2b3c4d`` -> {strategy: flowcut, budget: 64, data.limit: 6}.

    The runner names sweep jobs ``<overrides joined by ','>-<config hash>`` (``cli.run_name``); a value never
    holds a comma there (list overrides are left out of the name)."""
    m = re.fullmatch(r"(.*)-[0-9a-f]{8}", name)
    if not m or "=" not in m.group(1):
        return {}
    out: dict[str, str] = {}
    key = None
    for piece in m.group(1).split(","):
        if "=" in piece:
            key, value = piece.split("=", 1)
            out[key.lstrip("+~")] = value
        elif key is not None:
            out[key] += "," + piece
    return out


def read_sweep(*paths: str | os.PathLike) -> Sweep:
    """Every run under ``paths``; jobs a ``multirun.yaml`` expected but that never started are listed as missing."""
    runs, incomplete, notes, missing, sources, expected_known = [], [], [], [], [], False
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a directory: give a sweep directory "
                                    "(outputs/sweeps/<sweep_name>), a run directory, or wandb:<entity>/<project>")
        sources.append(str(path))
        found = [read_run(d) for d in run_dirs(path)]
        runs += [r for r in found if r.complete]
        incomplete += [r for r in found if not r.complete]
        for multirun in sorted(path.rglob("multirun.yaml")):
            jobs, why = expected_jobs(multirun)
            if jobs is None:
                notes.append(f"{multirun}: {why}; missing jobs are judged from gaps in the strategy x budget grid")
                continue
            expected_known = True
            sweep_runs = [r for r in found if Path(r.source).is_relative_to(multirun.parent)]
            for job in jobs:
                if not any(matches(r, job) for r in sweep_runs):
                    job_text = " ".join(f"{k}={v}" for k, v in job.items())
                    missing.append(f"{job_text} (never started; {multirun.parent})")
    if not runs and not incomplete:
        notes.append(f"no runs found under {', '.join(sources)}")
    return Sweep(runs, incomplete, missing, notes, sources, expected_known)


# --- the jobs a multirun.yaml asked for -----------------------------------------------------------------------
def expected_jobs(multirun: Path) -> tuple[list[dict] | None, str]:
    """The jobs of a Hydra sweep: the product of its comma-separated overrides (and sweeper params)."""
    data = _load_yaml(multirun) or {}
    hydra = data.get("hydra") or {}
    overrides = list(((hydra.get("overrides") or {}).get("task")) or [])
    params = (hydra.get("sweeper") or {}).get("params") or {}
    overrides += [f"{k}={v}" for k, v in params.items()]
    axes: dict[str, list[str]] = {}
    for o in overrides:
        if "=" not in o or o.startswith("~"):
            continue
        key, value = o.split("=", 1)
        key = key.lstrip("+")
        if key.startswith(NOT_IDENTITY):
            continue
        if re.match(r"\s*(choice|range|interval|glob|sort|shuffle|tag)\(", value):
            return None, f"cannot expand the sweep override {o!r}"
        axes[key] = _split_top_level(value)
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())], ""


def _split_top_level(value: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in value:
        depth += 1 if ch in "[({" else -1 if ch in "])}" else 0
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p.strip() for p in parts + [current]]


def matches(run: Run, job: dict[str, str]) -> bool:
    """Whether ``run`` is the job with these override values (config values, else its directory name)."""
    for key, value in job.items():
        if run.config:
            actual = _select(run.config, key)
            if isinstance(actual, dict):
                if "name" not in actual:
                    continue  # a group without a name (trainer): cannot tell, do not count it against the run
                actual = actual["name"]
        elif key in run.overrides:
            actual = run.overrides[key]
        else:
            continue
        if _normal(actual) != _normal(value):
            return False
    return True


def _select(config: dict, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _normal(value):
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value

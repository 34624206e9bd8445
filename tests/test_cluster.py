"""Sweeps through Hydra's submitit launcher: the jobs of ``submitit_local`` (the Slurm launcher's local twin) give
the basic launcher's results, and a job killed mid-run is the only one redone when the sweep is submitted again."""
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from test_ablate import CONFIGS, DEFAULT_RUN, ablate, env  # noqa: F401  (env: the runner's environment fixture)

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the [cluster] extra is not installed")

SWEEP = ("-m", *DEFAULT_RUN, "strategy=random,fastv", "budget=8,16", "data.limit=4", "logger=none")
KILLED = "strategy=fastv,budget=16"


def finished(sweep: Path) -> dict[str, Path]:
    return {d.name: d for d in sweep.iterdir() if (d / "metrics.json").exists()}


def outcome(run: Path) -> dict:
    """What a run found, without when, where and how fast."""
    metrics = json.loads((run / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    return {"metrics": metrics["metrics"], "tokens": metrics["tokens"], "counts": metrics["counts"],
            "fidelity": metrics["fidelity"], "strategy": metrics["strategy"],
            "rows": [(p["uid"], p["prediction"], p["kept"], p["n_in"], p["vanilla_prediction"]) for p in predictions]}


@pytest.mark.slow
def test_a_submitit_sweep_equals_the_basic_one_and_redoes_only_the_killed_job(env, tmp_path):
    basic = ablate(env, *SWEEP, f"output_root={tmp_path}", "sweep_name=basic")
    assert basic.returncode == 0, basic.stdout[-3000:]
    cluster_args = (*SWEEP, "hydra/launcher=submitit_local", f"output_root={tmp_path}", "sweep_name=cluster")
    sweep = tmp_path / "sweeps" / "cluster"

    first = ablate(env, *cluster_args, PRUNEKIT_KILL_AFTER_SAMPLES="2", PRUNEKIT_KILL_ONLY=KILLED)
    assert first.returncode != 0  # the killed job is reported; the other three finished
    done = finished(sweep)
    assert len(done) == 3 and not any(KILLED in name for name in done)
    assert any(KILLED in d.name for d in sweep.iterdir())  # it had started: its directory exists, unfinished
    stamps = {name: (d / "metrics.json").stat().st_mtime_ns for name, d in done.items()}

    second = ablate(env, *cluster_args)
    assert second.returncode == 0, second.stdout[-3000:]
    redone = finished(sweep)
    assert len(redone) == 4
    assert {name: (redone[name] / "metrics.json").stat().st_mtime_ns for name in stamps} == stamps  # not rerun

    ours, theirs = finished(tmp_path / "sweeps" / "basic"), redone
    assert sorted(ours) == sorted(theirs)  # the same job directories: overrides + config hash
    for name in ours:
        assert outcome(theirs[name]) == outcome(ours[name]), name


def test_the_slurm_launcher_config_gives_one_task_per_gpu():
    slurm = OmegaConf.load(CONFIGS / "hydra" / "launcher" / "slurm.yaml")
    assert slurm.defaults == ["submitit_slurm"]
    assert slurm.tasks_per_node == slurm.gpus_per_node == 1
    slurm.gpus_per_node = 4
    assert slurm.tasks_per_node == 4  # Lightning's ddp under Slurm: one process per GPU, rank from Slurm
    assert slurm.max_num_timeout > 0  # a pre-empted job is requeued

"""Sweeps through Hydra's submitit launcher: the jobs of ``submitit_local`` (the Slurm launcher's local twin) give
the basic launcher's results, and a job killed mid-run is the only one redone when the sweep is submitted again."""
import json
from pathlib import Path

import pytest

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
    (killed,) = [d for d in sweep.iterdir() if KILLED in d.name]  # it had started: its directory exists, unfinished
    assert "killed after 2 samples (PRUNEKIT_KILL_AFTER_SAMPLES)" in (killed / "ablate.log").read_text()
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


def test_the_slurm_launcher_composes_with_one_task_per_gpu():
    """Composed by Hydra against the launcher's own schema (SlurmQueueConf), as ``-m hydra/launcher=slurm`` does."""
    from hydra import compose, initialize_config_dir

    from prunekit.eval import cli

    cli.prepare([])
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        one = compose("ablate", overrides=["hydra/launcher=slurm"], return_hydra_config=True).hydra.launcher
        four = compose("ablate", overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4",
                                            "hydra.launcher.partition=gpu"], return_hydra_config=True).hydra.launcher
    assert one._target_.endswith("SlurmLauncher") and one.tasks_per_node == one.gpus_per_node == 1
    assert (four.tasks_per_node, four.partition) == (4, "gpu")  # ddp under Slurm: one process per GPU
    assert one.max_num_timeout > 0 and one.submitit_folder.endswith(".submitit/%j")

"""The Hydra runner: config composition, the command line, sweeps that never lose finished runs, DDP, W&B."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import prunekit
from prunekit.eval import cli
from prunekit.eval.run import strategy_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEFAULT_RUN = ("model=tiny", "data=synthetic")  # named, so a later change of the default changes no test here


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A clean environment for the runner: offline, W&B off, one shared cache for the tiny model and data."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MASTER_", "LOCAL_RANK", "NODE_RANK"))}
    return keep | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT),
                   "PRUNEKIT_CACHE": os.environ.get("PRUNEKIT_CACHE", str(tmp_path_factory.mktemp("cache")))}


def ablate(env, *overrides, cwd=None, **extra_env):
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "ablate.py"), *overrides], cwd=cwd,
                          env=env | extra_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)


def composed(*overrides):
    cli.prepare([])
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("ablate", overrides=list(overrides))


# --- composition (no subprocess) ---------------------------------------------------------------------
@pytest.mark.parametrize("name", prunekit.list_strategies())
def test_every_registered_strategy_composes_and_builds(name):
    cfg = composed(f"strategy={name}", "budget=8")
    knobs = strategy_config(cfg)
    strategy = prunekit.build_strategy(knobs)
    if "budget" in knobs:  # the top-level budget= is the strategy's budget
        assert knobs["budget"] == 8 and strategy.budget.tokens == 8


def test_defaults_are_the_embedded_model_and_data():
    cfg = composed()
    assert (cfg.strategy.name, cfg.model.name, cfg.data.name, cfg.data.benchmark) == ("flowcut", "tiny", "synthetic", "pope")
    assert cfg.budget == 16 and cfg.fidelity is True  # tiny: 16 of 64 tokens, fidelity since weights are random
    pocket = composed("model=pocket", "data=pocket")
    assert (pocket.model.path, pocket.data.benchmark, pocket.data.synthetic) == ("pocket", "pocket", True)
    assert pocket.budget == 64 and pocket.fidelity is True  # 64 of 576 tokens; real accuracy, fidelity next to it
    real = composed("model=llava15_7b", "data=pope")
    assert real.budget is None and real.fidelity is False and strategy_config(real)["budget"] == 64


@pytest.mark.parametrize("group", ["model", "data", "trainer", "logger", "experiment"])
def test_every_group_option_composes(group):
    for path in sorted((CONFIGS / group).glob("*.yaml")):
        cfg = composed(f"{group}={path.stem}")
        assert cfg.strategy.name in prunekit.list_strategies()


def test_flowcut_experiments_sweep_the_paper_grids():
    from omegaconf import OmegaConf

    def params(name):
        cli.prepare([])
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose("ablate", overrides=[f"experiment={name}"], return_hydra_config=True)
        return cfg, OmegaConf.to_container(cfg.hydra.sweeper.params)

    cfg, grid = params("flowcut_tab7_components")
    assert grid == {"strategy.schedule": "single_layer,uniform,adaptive", "strategy.history_weight": "0,0.5",
                    "strategy.semantic_term": "false,true"}
    assert cfg.budget == 128 and cfg.strategy.value_norm_term == cfg.strategy.semantic_term
    assert params("flowcut_tab10_history")[1] == {"strategy.history_weight": ",".join(
        ["0"] + [f"0.{i}" for i in range(1, 10)])}
    assert params("flowcut_tab11_interval")[1] == {"strategy.interval": "1,2,3,4,6,8,12"}


# --- the command line ----------------------------------------------------------------------------------
def test_single_run_writes_config_metrics_and_predictions(env, tmp_path):
    out = tmp_path / "run"
    proc = ablate(env, "strategy=random", *DEFAULT_RUN, "data.limit=3", "logger=csv", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["counts"] == {"samples": 3, "scored": 3, "skipped": 0}
    assert metrics["strategy"]["name"] == "random" and metrics["tokens"]["n_in"] == 16
    prov = metrics["provenance"]
    assert {"torch", "transformers", "lightning", "device", "dtype", "attn_implementation", "batch_size", "seed",
            "git_revision"} <= set(prov) and prov["dtype"] == "float32" and prov["attn_implementation"] == "sdpa"
    assert "random weights" in metrics["note"] and "fidelity" in metrics
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
    assert "budget: 16" in (out / "config.yaml").read_text()
    assert (out / "csv" / "metrics.csv").exists()
    assert "answer_agreement=" in proc.stdout and "random weights" in proc.stdout


@pytest.mark.contract
def test_the_default_run_removes_tokens_and_keep_all_agrees_with_vanilla(env, tmp_path):
    """The README's main job on the embedded default (FlowCut, a single pre-LLM cut) and keep_all beside it."""
    proc = ablate(env, "-m", "strategy=flowcut,keep_all", *DEFAULT_RUN, "data.limit=8", "logger=none",
                  f"output_root={tmp_path}")
    assert proc.returncode == 0, proc.stdout[-3000:]
    runs = {json.loads(p.read_text())["strategy"]["name"]: json.loads(p.read_text())
            for p in (tmp_path / "sweeps" / "sweep").glob("*/metrics.json")}
    t = runs["flowcut"]["tokens"]
    assert t["n_vanilla"] == 64 and 0 < t["n_final"] == t["n_in"] < t["n_vanilla"]  # one cut before the LLM
    assert runs["keep_all"]["fidelity"]["answer_agreement"] == 1.0 and runs["keep_all"]["tokens"]["n_in"] == 64


def test_sweep_rerun_skips_finished_runs_and_never_overwrites(env, tmp_path):
    args = ["-m", "strategy=random,keep_all", *DEFAULT_RUN, "data.limit=2", "logger=none", f"output_root={tmp_path}"]
    first = ablate(env, *args)
    assert first.returncode == 0, first.stdout[-3000:]
    finished, interrupted = sorted((tmp_path / "sweeps" / "sweep").glob("*/metrics.json"))
    before = finished.read_bytes()
    interrupted.unlink()  # as if the sweep had been killed during this job
    second = ablate(env, *args)
    assert second.returncode == 0, second.stdout[-3000:]
    assert second.stdout.count("already holds a complete run") == 1
    assert finished.read_bytes() == before and interrupted.exists()


def test_sweep_reruns_stale_or_truncated_runs_and_keeps_their_files(env, tmp_path):
    args = ["-m", "strategy=random,keep_all", *DEFAULT_RUN, "data.limit=2", "logger=none",
            f"output_root={tmp_path}"]
    assert ablate(env, *args).returncode == 0
    other_version, truncated = sorted((tmp_path / "sweeps" / "sweep").glob("*/metrics.json"))
    metrics = json.loads(other_version.read_text())
    metrics["provenance"]["transformers"] = "5.0.0"  # as if made before an upgrade
    other_version.write_text(json.dumps(metrics))
    predictions = truncated.parent / "predictions.jsonl"
    predictions.write_text(predictions.read_text().splitlines()[0] + "\n")  # 1 of 2 records
    second = ablate(env, *args)
    assert second.returncode == 0, second.stdout[-3000:]
    assert "already holds a complete run" not in second.stdout
    assert "made with other library versions (transformers 5.0.0 ->" in second.stdout
    assert "predictions.jsonl holds 1 readable records of 2 samples" in second.stdout
    for path in (other_version, truncated):
        [old] = (path.parent / "superseded").iterdir()  # the old files are kept, never deleted
        assert (old / "metrics.json").exists() and (old / "REASON").read_text()
        fresh = json.loads(path.read_text())
        assert fresh["complete"] and len((path.parent / "predictions.jsonl").read_text().splitlines()) == 2


def test_a_run_without_visual_tokens_is_never_a_finished_run():
    from prunekit.eval.run import no_visual_tokens

    assert no_visual_tokens({"counts": {"scored": 3}, "tokens": {"n_vanilla": 64, "n_in": 0}})
    assert not no_visual_tokens({"counts": {"scored": 3}, "tokens": {"n_vanilla": 64, "n_in": 16}})
    assert not no_visual_tokens({"counts": {"scored": 0}, "tokens": {"n_vanilla": 64, "n_in": 0}})


def test_unknown_strategy_or_knob_lists_what_exists(capsys):
    registered = prunekit.list_strategies()
    with pytest.raises(SystemExit) as exit:
        cli.prepare(["strategy=flowcutt"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Did you mean 'flowcut'" in err and all(n in err for n in registered)
    with pytest.raises(SystemExit):
        cli.prepare(["-m", "strategy=flowcut,random", "strategy.relays=cls"])
    err = capsys.readouterr().err
    assert "no knob 'relays'" in err and "relay" in err
    cli.prepare(["-m", "strategy=flowcut,random", "budget=4,8"])  # valid: no exit


def test_missing_data_root_and_model_path_are_named(tmp_path):
    from prunekit.eval.run import evaluate

    with pytest.raises(ValueError, match="data.root is not set"):
        evaluate(composed("data=gqa", "logger=none"), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match=r"data/test-\*\.parquet"):
        evaluate(composed("data=pope", f"data.root={tmp_path / 'nowhere'}", "logger=none"), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="model path '/no/such/llava' does not exist"):
        evaluate(composed("model.path=/no/such/llava", "logger=none"), tmp_path / "c")


PLUGIN = '''
import torch
from prunekit import Keep, Site, TokenPruner, register_strategy


@register_strategy("first_k")
class FirstK(TokenPruner):
    def __init__(self, budget: int = 32, stage: str = "vision_output"):
        super().__init__(budget)
        self.stage = stage

    def sites(self):
        return [Site(self.stage)]

    def prune(self, ctx):
        return Keep([torch.arange(ctx.target(u)) for u in range(ctx.num_units)])
'''


def test_strategy_from_a_plugin_module_runs_with_its_knobs(env, tmp_path):
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    out = tmp_path / "run"
    proc = ablate(env, "strategy=first_k", "plugins=[my_plugin]", *DEFAULT_RUN, "budget=5", "data.limit=1", "logger=none",
                  f"hydra.run.dir={out}", PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    assert proc.returncode == 0, proc.stdout[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["strategy"]["name"] == "first_k" and metrics["tokens"]["n_in"] == 5
    assert "stage: vision_output" in (out / "config.yaml").read_text()  # config node from the constructor


def test_wandb_offline_run_lands_in_the_run_directory(env, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    clean = {k: v for k, v in env.items() if k != "WANDB_MODE"}
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "ablate.py"), "strategy=random", *DEFAULT_RUN, "data.limit=2",
                           f"hydra.run.dir={out}"], env=clean | {"WANDB_API_KEY": "", "NETRC": str(tmp_path / "none"),
                                                                "HOME": str(tmp_path)},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert "wandb sync" in proc.stdout


@pytest.mark.slow
def test_ddp_on_two_processes_gives_the_metrics_of_one(env, tmp_path):
    """2 gloo processes over 5 rows (the sampler pads one): records gathered, de-duplicated by row id."""
    common = ["strategy=random", *DEFAULT_RUN, "data.limit=5", "logger=none"]
    ddp = ablate(env, *common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                 f"hydra.run.dir={tmp_path / 'ddp'}")
    assert ddp.returncode == 0, ddp.stdout[-3000:]
    one = ablate(env, *common, f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stdout[-3000:]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ddp", "one"))
    assert a["provenance"]["world_size"] == 2 and b["provenance"]["world_size"] == 1
    for key in ("counts", "metrics", "tokens", "fidelity"):
        assert a[key] == b[key], key
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "predictions.jsonl").read_text().splitlines()]
    assert [r["uid"] for r in rows] == ["0", "1", "2", "3", "4"]


def test_newer_methods_sweep_and_compare_tables_it(env, tmp_path):
    """MMTok, CDPruner and VisPruner beside FlowCut at 64 / 128 / 192 of 576 tokens on the bundled data, then
    compare.py's table with MMTok's published row (docs/strategies/mmtok.md)."""
    proc = ablate(env, "-m", "strategy=mmtok,cdpruner,vispruner,flowcut", "budget=64,128,192", "model=tiny_576",
                  "data=synthetic", "data.limit=2", "logger=none", f"output_root={tmp_path}", "sweep_name=newer")
    assert proc.returncode == 0, proc.stdout[-3000:]
    runs = [json.loads(p.read_text()) for p in (tmp_path / "sweeps" / "newer").glob("*/metrics.json")]
    assert sorted((r["strategy"]["name"], r["tokens"]["n_in"]) for r in runs) == sorted(
        (name, float(b)) for name in ("cdpruner", "flowcut", "mmtok", "vispruner") for b in (64, 128, 192))
    table = subprocess.run([sys.executable, str(ROOT / "experiments" / "compare.py"), str(tmp_path / "sweeps" / "newer"),
                            "--published", "mmtok_tab1", "--no-overlays", "--no-plots", "-q"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert table.returncode == 0, table.stdout[-3000:]
    rows = [line for line in (tmp_path / "sweeps" / "newer" / "compare" / "table.md").read_text().splitlines()
            if line.startswith(("| mmtok |", "| cdpruner |", "| vispruner |", "| flowcut |"))]
    assert len(rows) == 12 and any(line.startswith("| mmtok | 64 |") and "85.8" in line for line in rows)

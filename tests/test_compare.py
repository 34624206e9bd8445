"""Comparative studies (experiments/compare.py, prunekit/study): table, statistics, plots, overlays, W&B, bad input.

One small real sweep on the embedded default (keep_all, random, flowcut, sparsevlm at 8 and 16 of 64 tokens,
6 samples) is built in-process and compared; copies of it are edited to stand for a model that answers, a
partial sweep and a sweep over two datasets.
"""
import csv
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from prunekit.eval import cli
from prunekit.eval.benchmarks import get_benchmark
from prunekit.eval.metrics import pope_metrics
from prunekit.eval.records import decode_positions, encode_positions
from prunekit.study import Metric, bootstrap_ci, build_study, paired_test, read_sweep
from prunekit.study.table import write_csv

ROOT = Path(__file__).resolve().parents[1]
JOBS = [("keep_all", 8), ("keep_all", 16), ("random", 8), ("random", 16), ("flowcut", 8), ("flowcut", 16),
        ("sparsevlm", 8), ("sparsevlm", 16)]
MULTIRUN = """hydra:
  overrides:
    task:
    - strategy=keep_all,random,flowcut,sparsevlm
    - budget=8,16
    - data.limit=6
    - logger=none
  sweeper:
    params: null
"""
spec = importlib.util.spec_from_file_location("compare", ROOT / "experiments" / "compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The layout of `ablate.py -m strategy=keep_all,random,flowcut,sparsevlm budget=8,16 data.limit=6`."""
    from prunekit.eval.run import evaluate

    out = tmp_path_factory.mktemp("outputs") / "sweeps" / "sweep"
    cli.prepare([])
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for strategy, budget in JOBS:
            overrides = [f"strategy={strategy}", f"budget={budget}", "model=tiny", "data=synthetic", "data.limit=6",
                         "logger=none"]
            cfg = compose("ablate", overrides=overrides)
            evaluate(cfg, out / f"strategy={strategy},budget={budget},data.limit=6-{cli.fingerprint(cfg)}")
    (out / "multirun.yaml").write_text(MULTIRUN)
    return out


def run_dir(sweep, strategy, budget):
    return next(sweep.glob(f"strategy={strategy},budget={budget},*"))


def records(path):
    return [json.loads(line) for line in (path / "predictions.jsonl").read_text().splitlines()]


def metrics(path):
    return json.loads((path / "metrics.json").read_text())


def table(out):
    with open(out / "table.csv") as f:
        return {(r["label"], r["budget"]): r for r in csv.DictReader(f)}


def copy_sweep(sweep, dest):
    shutil.copytree(sweep, dest, ignore=shutil.ignore_patterns("compare"))
    return dest


def answer(path, correct):
    """Rewrite a run as if its model had answered: right on the uids in ``correct``, wrong elsewhere."""
    recs = records(path)
    for r in recs:
        r["prediction"] = r["answer"] if r["uid"] in correct else {"yes": "no", "no": "yes"}[r["answer"]]
        r["score"] = get_benchmark("pope").score(r["prediction"], r["answer"])
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    m = metrics(path)
    m["metrics"] = get_benchmark("pope").aggregate(recs)
    m["model"]["random_weights"] = False
    (path / "metrics.json").write_text(json.dumps(m))
    return recs


# --- the per-sample record's kept positions ---------------------------------------------------------------
def test_records_hold_kept_positions_after_each_cut(sweep):
    assert decode_positions(encode_positions([0, 5, 63])) == [0, 5, 63] and decode_positions(encode_positions([])) == []
    for r in records(run_dir(sweep, "flowcut", 8)):
        assert len(decode_positions(r["kept"])) == r["n_final"] == 8
        assert list(r["kept_after"]) == ["vision_layer[3]"]
    for r in records(run_dir(sweep, "sparsevlm", 8)):
        counts = [len(decode_positions(m)) for m in r["kept_after"].values()]
        assert list(r["kept_after"]) == ["llm_layer[1]", "llm_layer[2]", "llm_layer[3]"]
        assert counts == sorted(counts, reverse=True) and counts[-1] == r["n_final"]
        assert set(decode_positions(r["kept"])) == set(decode_positions(r["kept_after"]["llm_layer[3]"]))
    keep_all = records(run_dir(sweep, "keep_all", 8))[0]
    assert decode_positions(keep_all["kept"]) == list(range(64))


# --- the command line on the real sweep -------------------------------------------------------------------
def test_table_holds_every_row_with_the_runs_values(sweep, capsys):
    assert compare.main([str(sweep), "--resamples", "200", "--published", "flowcut_tab1"]) == 0
    printed = capsys.readouterr().out
    out = sweep / "compare"
    rows = table(out)
    assert set(rows) == {("keep_all", ""), *{(s, str(b)) for s, b in JOBS if s != "keep_all"}}
    for (label, budget), row in rows.items():
        path = Path(row["runs"])  # one dataset: one run per row
        if label == "keep_all":  # swept over both budgets (budget= does not apply to it): either run, named in notes
            assert path.name.startswith("strategy=keep_all,")
        else:
            assert path == run_dir(sweep, label, budget)
        m = metrics(path)
        assert float(row["synthetic/f1"]) == pytest.approx(100 * m["metrics"]["f1"])
        assert float(row["synthetic/answer_agreement"]) == pytest.approx(100 * m["fidelity"]["answer_agreement"])
        for k in ("n_in", "n_final", "n_avg", "n_avg_out"):
            assert float(row[k]) == pytest.approx(m["tokens"][k])
        for k in ("tflops", "tflops_fastv"):
            assert float(row[k]) == pytest.approx(m["efficiency"][k])
        assert float(row["prefill_ms_median"]) == pytest.approx(m["efficiency"]["prefill_ms_median"])
        ref_ms = metrics(Path(rows[("keep_all", "")]["runs"]))["efficiency"]["prefill_ms_median"]
        assert float(row["speedup"]) == pytest.approx(ref_ms / m["efficiency"]["prefill_ms_median"])
        assert int(row["synthetic/samples"]) == 6
        for metric in ("f1", "answer_agreement", "first_token_kl"):
            lo, value, hi = (float(row[f"synthetic/{metric}{s}"]) for s in ("_lo", "", "_hi"))
            assert lo <= value + 1e-9 and value <= hi + 1e-9, metric
        assert row["synthetic/rel_%"] == ""  # the random model's F1 is 0: no relative score, not a division by 0
    assert rows[("keep_all", "")]["synthetic/paper_f1"] == "85.9" and rows[("flowcut", "8")]["synthetic/paper_f1"] == ""
    assert rows[("sparsevlm", "8")]["n_in"] == "64.0" and float(rows[("sparsevlm", "8")]["n_avg"]) > 8  # in-LLM cuts
    md = (out / "table.md").read_text()
    assert md in printed and "| flowcut | 8 |" in md and "| keep_all | all |" in md and "synthetic paper f1" in md
    assert "duplicate keep_all runs" in md and "Missing or incomplete" not in md  # multirun.yaml: every job is there
    with open(out / "pairs.csv") as f:
        pairs = list(csv.DictReader(f))
    # a random-weight model is compared on agreement only; per budget: 3 pairs of strategies and 3 against keep_all
    assert {p["metric"] for p in pairs} == {"answer_agreement"} and len(pairs) == 2 * (3 + 3)
    assert all(0 < float(p["p"]) <= 1 for p in pairs)


def test_plots_and_overlays_are_pictures(sweep):
    out = sweep / "compare"
    if not (out / "table.csv").exists():
        compare.main([str(sweep), "--resamples", "50", "-q"])
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    overlays = sorted(p.name for p in (out / "overlays").glob("*.png"))
    assert plots == ["score_vs_tflops.png", "score_vs_tokens.png", "speedup_vs_tokens.png"]
    assert overlays == ["synthetic_budget16.png", "synthetic_budget8.png", "synthetic_sparsevlm_budget16_cuts.png",
                        "synthetic_sparsevlm_budget8_cuts.png"]
    for path in [*(out / "plots").glob("*.png"), *(out / "overlays").glob("*.png")]:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and 400 <= im.width <= 4000 and 300 <= im.height <= 4000, path.name
            assert np.asarray(im.convert("L")).std() > 10, f"{path.name} looks blank"
    with Image.open(out / "overlays" / "synthetic_budget8.png") as im:
        assert im.width > 3 * 224  # the picture plus one column per strategy (3), different pictures per row
        cells = json.loads(im.text["cells"])  # the sheet's labels, stored in the PNG
    final = {s: records(run_dir(sweep, s, 8)) for s in ("flowcut", "random", "sparsevlm")}
    assert len(cells) == 3 and cells[0][0].startswith("uid 0: ")  # 6 questions, two per picture: 3 pictures
    for row in cells:
        uid = row[0].split(":")[0].split()[1]
        n = {s: len(decode_positions(next(r for r in recs if r["uid"] == uid)["kept"])) for s, recs in final.items()}
        assert row[1:] == [f"{s}: {n[s]}/64" for s in ("flowcut", "random", "sparsevlm")]
    with Image.open(out / "overlays" / "synthetic_sparsevlm_budget8_cuts.png") as im:
        sites = [c.split(":")[0] for c in json.loads(im.text["cells"])[0][1:]]
    assert sites == ["llm_layer[1]", "llm_layer[2]", "llm_layer[3]"]


# --- relative scores, published numbers and paired tests on a model that answers -------------------------
def test_relative_scores_and_paired_tests_by_hand(sweep, tmp_path):
    copy = copy_sweep(sweep, tmp_path / "answers")
    uids = [str(i) for i in range(6)]
    for path in copy.glob("strategy=*"):
        answer(path, set(uids[:4]))  # the whole sweep now stands for a model that answers
    ref = answer(run_dir(copy, "keep_all", 16), set(uids[:5]))
    answer(run_dir(copy, "keep_all", 8), set(uids[:5]))
    answer(run_dir(copy, "random", 8), set(uids[:5]))  # identical to the unpruned answers
    mine = answer(run_dir(copy, "flowcut", 8), set(uids[:2]))
    study = build_study(read_sweep(copy), resamples=300)
    row = next(r for r in study.rows if (r.label, r.budget) == ("flowcut", 8))
    f1 = lambda recs: pope_metrics([r["prediction"] for r in recs], [r["answer"] for r in recs])["f1"]  # noqa: E731
    assert row.values["synthetic/f1"] == pytest.approx(100 * f1(mine))
    assert row.values["synthetic/rel_%"] == pytest.approx(100 * f1(mine) / f1(ref))
    pairs = {(p["a"], p["a_budget"], p["b"], p["metric"]): p for p in study.pairs}
    same = pairs[("random", 8, "keep_all", "f1")]
    assert same["diff"] == 0 and same["p"] == 1.0 and same["n"] == 6
    worse = pairs[("flowcut", 8, "keep_all", "f1")]
    assert worse["diff"] == pytest.approx(100 * (f1(mine) - f1(ref)))
    assert worse["diff_lo"] <= worse["diff"] <= worse["diff_hi"]
    assert worse["p"] < 1.0


def test_relative_score_without_keep_all_uses_the_recorded_vanilla_answers(sweep, tmp_path):
    copy = copy_sweep(sweep, tmp_path / "no_ref")
    for budget in (8, 16):
        shutil.rmtree(run_dir(copy, "keep_all", budget))
    path = run_dir(copy, "flowcut", 8)
    recs = answer(path, {"0", "1", "2"})
    for r in recs:
        r["vanilla_prediction"] = r["answer"]  # the unpruned model got everything right
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    study = build_study(read_sweep(copy), resamples=50)
    row = next(r for r in study.rows if (r.label, r.budget) == ("flowcut", 8))
    assert row.values["synthetic/rel_%"] == pytest.approx(100 * row.values["synthetic/f1"] / 100.0)
    assert row.values.get("speedup") is None
    assert any("no unpruned (keep_all) run" in n and "vanilla answers" in n for n in study.notes)
    assert any("keep_all" in m and "never started" in m for m in study.missing)


# --- bad input ----------------------------------------------------------------------------------------------
def test_partial_sweep_shows_what_is_there_and_lists_what_is_not(sweep, tmp_path, capsys):
    copy = copy_sweep(sweep, tmp_path / "partial")
    shutil.rmtree(run_dir(copy, "random", 16))  # never started
    (run_dir(copy, "flowcut", 16) / "metrics.json").unlink()  # interrupted
    (run_dir(copy, "sparsevlm", 8) / "predictions.jsonl").unlink()  # finished, records lost
    assert compare.main([str(copy), "--resamples", "50", "--no-plots", "--no-overlays", "-q",
                         "--metric", "synthetic=accuracy"]) == 0
    rows = table(copy / "compare")
    assert ("random", "16") not in rows and ("flowcut", "16") not in rows and ("flowcut", "8") in rows
    assert rows[("sparsevlm", "8")]["synthetic/f1_lo"] == "" and rows[("sparsevlm", "8")]["n_in"] == "64.0"
    md = (copy / "compare" / "table.md").read_text()
    assert "synthetic accuracy (95% CI)" in md and "synthetic f1 (95% CI)" not in md
    assert "- missing: strategy=random budget=16 data.limit=6 (never started" in md
    assert "- incomplete: flowcut" in md and "no metrics.json" in md
    assert "no predictions.jsonl" in md


def test_a_truncated_predictions_file_leaves_its_run_out_and_says_so(sweep, tmp_path, capsys):
    copy = copy_sweep(sweep, tmp_path / "truncated")
    path = run_dir(copy, "random", 8) / "predictions.jsonl"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:2]))  # 2 of 6 records
    assert compare.main([str(copy), "--resamples", "50", "--no-plots", "--no-overlays", "-q"]) == 0
    rows = table(copy / "compare")
    assert ("random", "8") not in rows and ("random", "16") in rows
    md = (copy / "compare" / "table.md").read_text()
    assert "- incomplete: random" in md and "predictions.jsonl holds 2 of its 6 samples (truncated)" in md


def test_grid_gaps_and_a_second_dataset_are_listed(sweep, tmp_path):
    copy = copy_sweep(sweep, tmp_path / "two_data")
    (copy / "multirun.yaml").unlink()  # without it, gaps are judged from the strategy x budget grid
    shutil.rmtree(run_dir(copy, "flowcut", 16))
    other = run_dir(copy, "random", 8)
    moved = other.with_name(other.name.replace("-", "-other-", 1))
    shutil.copytree(other, moved)
    (moved / "config.yaml").write_text((moved / "config.yaml").read_text().replace("name: synthetic", "name: other"))
    study = build_study(read_sweep(copy), resamples=50)
    assert study.datasets == ["other", "synthetic"]
    random8 = next(r for r in study.rows if (r.label, r.budget) == ("random", 8))
    assert set(random8.runs) == {"other", "synthetic"} and random8.values["avg_rel_%"] is None
    assert "flowcut budget=16 (tiny): no run (a gap in the strategy x budget grid)" in study.missing
    assert "flowcut budget=8 (tiny): no run on other" in study.missing
    write_csv(study, tmp_path / "t.csv")
    with open(tmp_path / "t.csv") as f:
        assert {"other/f1", "synthetic/f1"} <= set(next(csv.reader(f)))


def test_empty_or_missing_directory(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert compare.main([str(empty), "-q"]) == 0
    assert "No complete runs" in (empty / "compare" / "table.md").read_text()
    assert "no runs found" in (empty / "compare" / "table.md").read_text()
    assert (empty / "compare" / "table.csv").read_text().startswith("model,strategy,label,budget")
    assert "no complete runs" in capsys.readouterr().err
    assert compare.main([str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err


# --- statistics ------------------------------------------------------------------------------------------
def test_bootstrap_and_paired_tests():
    rng = np.random.default_rng(1)
    recs = [{"uid": str(i), "score": float(s), "prediction": "yes" if s else "no", "answer": "yes"}
            for i, s in enumerate(rng.random(200) < 0.7)]
    ci = bootstrap_ci(recs, [Metric("accuracy", "gqa"), Metric("f1", "pope")], resamples=300)
    value, lo, hi = ci["accuracy"]
    assert value == pytest.approx(100 * np.mean([r["score"] for r in recs])) and lo < value < hi and hi - lo < 20
    assert ci["f1"][1] <= ci["f1"][0] <= ci["f1"][2]
    for metric in (Metric("accuracy", "gqa"), Metric("f1", "pope")):
        same = paired_test(recs, [dict(r) for r in recs], metric, resamples=200)
        assert same["diff"] == 0 and same["p"] == 1.0 and same["diff_lo"] == same["diff_hi"] == 0
    flipped = [r | {"score": 0.0, "prediction": "no"} for r in recs]
    far = paired_test(recs, flipped, Metric("accuracy", "gqa"), resamples=200)
    assert far["diff"] > 50 and far["p"] == pytest.approx(1 / 201)
    # MME resamples whole images (question pairs), so acc_plus stays computable on every draw
    mme = [{"uid": str(i), "question_id": f"img{i // 2}", "category": "color", "answer": "yes", "prediction": p}
           for i, p in enumerate(["yes", "yes", "yes", "no"] * 10)]
    total, lo, hi = bootstrap_ci(mme, [Metric("total", "mme")], resamples=100)["total"]
    assert lo <= total <= hi and total == pytest.approx(75 + 50)


def test_fast_kernels_equal_the_benchmarks_aggregate():
    """The vectorised resampling computes, per resample, exactly what the benchmark's aggregate gives."""
    from prunekit.study.stats import _clusters, _draw, _kernel, _weights

    rng = np.random.default_rng(3)
    pope = [{"uid": str(i), "prediction": str(rng.choice(["yes", "No ", "maybe", "yes."])),
             "answer": str(rng.choice(["yes", "no"]))} for i in range(40)]
    for r in pope:
        r["score"] = get_benchmark("pope").score(r["prediction"], r["answer"])
    categories = ["existence", "color", "OCR", "code_reasoning", "text_translation"]
    mme = [{"uid": str(i), "question_id": f"img{i // 2}", "category": categories[(i // 2) % 5],
            "answer": str(rng.choice(["Yes", "No"])), "prediction": str(rng.choice(["Yes", "no", "maybe"]))}
           for i in range(60)]
    kinds = ["existence", "attribute", "counting", "spatial"]
    pocket = [{"uid": str(i), "category": kinds[i % 4], "answer": "red", "prediction": str(rng.choice(["red", "Red.", "no"]))}
              for i in range(60)]
    for r in pocket:
        r["score"] = get_benchmark("pocket").score(r["prediction"], r["answer"])
    cases = [("pope", pope, ["accuracy", "precision", "recall", "f1", "yes_ratio"]),
             ("mme", mme, ["total", "perception", "cognition"]),
             ("pocket", pocket, ["accuracy"] + [f"accuracy_{k}" for k in kinds])]
    for bench, recs, names in cases:
        clusters = _clusters(recs, bench)
        for w in _weights(rng, len(clusters), 6):
            picks = np.repeat(np.arange(len(clusters)), w.astype(int))
            expected = get_benchmark(bench).aggregate(_draw(recs, clusters, picks, bench))
            for name in names:
                metric = Metric(name, bench)
                got = _kernel(metric, recs, clusters).values(w[None])[0]
                assert got == pytest.approx(expected[name] * metric.scale, abs=1e-9), (bench, name)


# --- overlay geometry ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2-vl"])
def test_overlay_boxes_follow_the_processor_geometry(name):
    """A bright spot on a wide picture lands in the token whose box the overlay draws around it."""
    from transformers import AutoConfig

    from prunekit.loading import load_processor, resolve_model_path
    from prunekit.study.overlays import patch_boxes

    path = resolve_model_path(name)
    model_type = AutoConfig.from_pretrained(path).model_type
    processor = load_processor(path, model_type)
    picture = np.zeros((100, 200, 3), np.uint8)
    picture[40:52, 120:132] = 255
    image = Image.fromarray(picture)
    boxes = patch_boxes(processor, model_type, image)
    pixels = processor.image_processor(images=[image], return_tensors="np")["pixel_values"]
    if model_type == "llava":
        grid = pixels[0].mean(0).reshape(8, 14, 8, 14).mean((1, 3))  # (3, 112, 112) -> the 8 x 8 patch grid
        hot = int(np.argmax(grid))
        assert len(boxes) == 64 and boxes[0][0] == pytest.approx(50) and boxes[-1][2] == pytest.approx(150)
    else:  # packed rows, one per 14 px patch, 2x2 merge groups contiguous: a merge group is 4 rows
        hot = int(np.argmax(pixels.reshape(len(boxes), -1).mean(1)))
    x0, y0, x1, y1 = boxes[hot]
    assert x0 <= 126 <= x1 and y0 <= 46 <= y1
    assert boxes[:, 0].min() >= -1e-6 and boxes[:, 2].max() <= 200 + 1e-6


def test_overlays_skip_llava_next_with_a_reason():
    from prunekit.study.overlays import Unsupported, patch_boxes

    with pytest.raises(Unsupported, match="llava_next"):
        patch_boxes(None, "llava_next", Image.new("RGB", (10, 10)))


# --- W&B -------------------------------------------------------------------------------------------------------
def test_wandb_logging_and_reading_back(sweep, monkeypatch):
    pytest.importorskip("wandb")
    from prunekit.study.wandb_io import log_study, read_wandb

    study = build_study(read_sweep(sweep), resamples=20)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logged = log_study(study, [], sweep)
    assert {"comparison", "paired_tests", "charts/tiny/synthetic/answer_agreement_vs_n_avg"} <= set(logged)
    assert logged["comparison"].columns[:4] == ["model", "strategy", "label", "budget"]

    class Table:  # what artifact.get("predictions") gives: the runner's W&B predictions table
        columns = ["uid", "question_id", "category", "question", "answer", "prediction", "score", "agrees_with_vanilla",
                   "first_token_kl"]

        def __init__(self, recs):
            self.data = [[r[c] for c in self.columns] for r in recs]

    class Artifact:
        type, name = "run_table", "run-abc-predictions"

        def __init__(self, recs):
            self.table = Table(recs)

        def get(self, key):
            return self.table

    class WandbRun:
        def __init__(self, path, state="finished"):
            m, self.state, self.name = metrics(path), state, path.name
            self.config = __import__("yaml").safe_load((path / "config.yaml").read_text())
            self.summary = {f"{g}/{k}": v for g in ("metrics", "tokens", "efficiency", "fidelity", "counts")
                            for k, v in m.get(g, {}).items()} | {"strategy": m["strategy"]}
            self.recs = records(path)

        def logged_artifacts(self):
            return [Artifact(self.recs)]

    class Api:
        def runs(self, path, filters=None):
            assert path == "team/prunekit" and filters == {"group": "g"}
            finished = [WandbRun(run_dir(sweep, s, b)) for s, b in JOBS[1:4]]  # keep_all, random @8 and @16
            return finished + [WandbRun(run_dir(sweep, "flowcut", 8), "crashed")]

    read = read_wandb("team/prunekit", api=Api(), filters={"group": "g"})
    assert len(read.runs) == 3 and len(read.incomplete) == 1 and "crashed" in read.incomplete[0].problem
    study = build_study(read, resamples=20)
    random8 = next(r for r in study.rows if (r.label, r.budget) == ("random", 8))
    m = metrics(run_dir(sweep, "random", 8))
    assert random8.values["synthetic/answer_agreement"] == pytest.approx(100 * m["fidelity"]["answer_agreement"])
    assert random8.values["synthetic/answer_agreement_lo"] is not None and random8.values["speedup"] is not None


# --- ranking against the published numbers ------------------------------------------------------------------
def test_ranks_and_spearman_by_hand():
    from prunekit.study.ranking import ranks, spearman

    assert ranks([10, 30, 20]).tolist() == [3, 1, 2]
    assert ranks([5, 7, 5, 1]).tolist() == [2.5, 1, 2.5, 4]  # ties share their mean rank
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (3, 2, 1) vs (3, 1, 2): d = (0, 1, -1), rho = 1 - 6 * 2 / (3 * 8) = 0.5
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="tied"):
        spearman([1, 1, 1], [1, 2, 3])


def test_published_scores_average_relative_scores_over_sources_and_benchmarks():
    from prunekit.study.ranking import published_scores

    scores = published_scores(64)
    assert set(scores) == {"cdpruner", "dart", "divprune", "fastv", "flowcut", "mmtok", "pdrop", "sparsevlm",
                           "visionzip", "vispruner"}
    # FlowCut at 64 is in flowcut_tab1 only: GQA 55.6/61.9, MME 1744/1862, POPE 80.2/85.9, TextVQA 55.6/58.2
    by_hand = 100 * (55.6 / 61.9 + 1744 / 1862 + 80.2 / 85.9 + 55.6 / 58.2) / 4
    assert scores["flowcut"] == pytest.approx(by_hand)
    # VisPruner at 64 is in vispruner_tab1 only, without MME (perception only there): GQA, POPE, TextVQA
    assert scores["vispruner"] == pytest.approx(100 * (55.4 / 62.0 + 80.4 / 85.9 + 55.8 / 58.2) / 3)

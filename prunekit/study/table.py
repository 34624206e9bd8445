"""The comparison table: rows strategy x budget, columns per benchmark, plus efficiency; Markdown and CSV.

A row is one (model, strategy label, budget); its runs are one per dataset. The label is the strategy name
plus the knobs (and the few config keys, e.g. seed) that differ between runs of that strategy in the sweep,
so an ablation's variants get their own rows. Scores are in points (fractions x100) as the papers print them,
MME in its score units. The unpruned reference of a (model, dataset) is its ``keep_all`` run; without one,
relative scores come from the vanilla answers the runs recorded (``fidelity``), else they are unavailable.
"""
from __future__ import annotations

import csv
import itertools
import math
import statistics
from dataclasses import dataclass, field

from ..eval.benchmarks import get_benchmark
from .collect import Run, Sweep
from .published import PAPER_METRIC, SOURCES, published
from .stats import SCALE, Metric, bootstrap_ci, paired_test

UNPRUNED = "keep_all"
TABLE_METRICS = {"pope": ("f1", "accuracy", "precision", "recall"), "mme": ("total", "perception", "cognition"),
                 "gqa": ("accuracy",), "textvqa": ("accuracy",),
                 "pocket": ("accuracy", "accuracy_existence", "accuracy_attribute", "accuracy_counting",
                            "accuracy_spatial")}
HEADLINE = {b: m[0] for b, m in TABLE_METRICS.items()}  # POPE F1, MME total: what the papers' tables report
LABEL_KEYS = ("seed", "data.limit", "model.dtype", "model.attn_implementation", "fidelity")
TOKENS = ("n_in", "n_final", "n_avg", "n_avg_out")
FLOPS = ("tflops", "tflops_fastv", "tflops_vanilla", "tflops_fastv_vanilla")


@dataclass
class Row:
    model: str
    label: str  # strategy plus the knobs that tell its runs apart
    strategy: str
    budget: int | float | None
    runs: dict[str, Run] = field(default_factory=dict)  # dataset -> run
    values: dict[str, float | None] = field(default_factory=dict)  # CSV column -> value

    @property
    def reference(self) -> bool:
        return self.strategy == UNPRUNED


@dataclass
class Study:
    rows: list[Row]
    datasets: list[str]
    benchmarks: dict[str, str]  # dataset -> benchmark
    headline: dict[str, str]  # dataset -> its headline metric
    pairs: list[dict]
    missing: list[str]
    incomplete: list[str]
    notes: list[str]
    published: str | None = None
    random_weights: set[str] = field(default_factory=set)  # models with random weights

    def rows_of(self, model: str) -> list[Row]:
        return [r for r in self.rows if r.model == model]

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(r.model for r in self.rows))


def build_study(sweep: Sweep, resamples: int = 1000, seed: int = 0, published_source: str | None = None,
                headline: dict[str, str] | None = None) -> Study:
    if published_source is not None and published_source not in SOURCES:
        raise ValueError(f"unknown published source {published_source!r}; choose one of {sorted(SOURCES)}")
    notes = list(sweep.notes)
    rows = _rows(sweep.runs, notes)
    datasets = sorted({ds for r in rows for ds in r.runs})
    benchmarks = {ds: next(r.runs[ds].benchmark for r in rows if ds in r.runs) for ds in datasets}
    chosen = {ds: (headline or {}).get(ds) or HEADLINE.get(benchmarks[ds], "accuracy") for ds in datasets}
    study = Study(rows, datasets, benchmarks, chosen, [], list(sweep.missing),
                  [f"{r.describe()}: {r.problem}" for r in sweep.incomplete], notes, published_source,
                  {r.model for r in sweep.runs if r.random_weights})
    for run in sweep.runs:
        if run.problem:
            notes.append(f"{run.describe()}: {run.problem}")
    for ds, metric in chosen.items():
        found = {k for r in rows if ds in r.runs for k, v in r.runs[ds].metrics["metrics"].items()
                 if isinstance(v, (int, float))}
        if metric not in found:
            notes.append(f"{ds} has no metric {metric!r}; its metrics: {', '.join(sorted(found))} (--metric {ds}=...)")
    for model in study.models:
        _fill(study, model, resamples, seed)
    study.pairs = _pairs(study, resamples, seed)
    study.missing += _gaps(study, sweep.expected_known)
    if study.random_weights:
        notes.insert(0, f"random weights ({', '.join(sorted(study.random_weights))}): benchmark scores mean nothing; "
                        "read answer agreement with the unpruned model (agree %) and first-token KL instead")
    return study


# --- rows --------------------------------------------------------------------------------------------------
def _rows(runs: list[Run], notes: list[str]) -> list[Row]:
    labels = _labels(runs)
    rows: dict[tuple, Row] = {}
    for run in sorted(runs, key=lambda r: r.name):
        key = (run.model, labels[id(run)], None if run.strategy == UNPRUNED else run.budget)
        row = rows.setdefault(key, Row(key[0], key[1], run.strategy, key[2]))
        kept = row.runs.get(run.dataset)
        if kept is None:
            row.runs[run.dataset] = run
            continue
        # a re-run, or keep_all swept over budgets (budget= does not apply to it): keep the larger run
        best = max((kept, run), key=lambda r: r.metrics["counts"]["scored"])
        row.runs[run.dataset] = best
        other = run if best is kept else kept
        what = (f"{row.label} runs (budget= has no effect on it)" if row.reference
                else f"runs of {row.label} budget={row.budget}")
        notes.append(f"duplicate {what} on {run.dataset}: using {best.name}, not {other.name}")
    order = lambda r: (r.model, not r.reference, -(r.budget or math.inf), r.label)  # noqa: E731
    return sorted(rows.values(), key=order)


def _labels(runs: list[Run]) -> dict[int, str]:
    """Strategy name plus what differs between that strategy's runs on one model (knobs other than budget,
    and a few config keys such as seed): an ablation's variants get their own rows."""
    def config_value(run, key):
        node = run.config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    labels = {}
    for model, name in {(r.model, r.strategy) for r in runs}:
        mine = [r for r in runs if (r.model, r.strategy) == (model, name)]
        keys = sorted({k for r in mine for k in r.knobs if k != "budget"})
        varying = [k for k in keys if len({repr(r.knobs.get(k)) for r in mine}) > 1]
        extra = [k for k in LABEL_KEYS if len({repr(config_value(r, k)) for r in runs if r.model == model}) > 1]
        for r in mine:
            parts = [f"{k}={r.knobs.get(k)}" for k in varying] + [f"{k}={config_value(r, k)}" for k in extra]
            labels[id(r)] = name + (f" ({', '.join(parts)})" if parts else "")
    return labels


def reference_row(study: Study, model: str) -> Row | None:
    refs = [r for r in study.rows_of(model) if r.reference]
    return next((r for r in refs if r.label == UNPRUNED), refs[0] if refs else None)


def _fill(study: Study, model: str, resamples: int, seed: int) -> None:
    ref = reference_row(study, model)
    for ds in study.datasets:
        if any(ds in r.runs for r in study.rows_of(model)) and (ref is None or ds not in ref.runs):
            vanilla = any(r.records and "vanilla_prediction" in (r.scored or [{}])[0]
                          for row in study.rows_of(model) for r in [row.runs.get(ds)] if r)
            study.notes.append(f"no unpruned (keep_all) run for {model} on {ds}: relative scores " + (
                "use the vanilla answers each run recorded (fidelity)" if vanilla else "are unavailable") +
                "; speedup is unavailable. Add one with: python experiments/ablate.py -m strategy=keep_all "
                "sweep_name=<this sweep> <the sweep's model/data overrides>")
    for row in study.rows_of(model):
        v = row.values
        for ds, run in row.runs.items():
            bench, metric = study.benchmarks[ds], study.headline[ds]
            scored = run.scored
            names = [m for m in TABLE_METRICS.get(bench, (metric,)) if m in run.metrics["metrics"]]
            if metric not in names and metric in run.metrics["metrics"]:
                names.insert(0, metric)
            fidelity = [m for m in ("answer_agreement", "first_token_kl") if m in run.metrics.get("fidelity", {})]
            cis = {}
            if scored:
                wanted = [Metric(m, bench) for m in names + fidelity if Metric(m, bench).available(scored)]
                cis = bootstrap_ci(scored, [m for m in wanted if m.name not in fidelity], resamples, seed) | \
                    bootstrap_ci(scored, [m for m in wanted if m.name in fidelity], resamples, seed)
            for m in names:
                v[f"{ds}/{m}"] = run.metrics["metrics"][m] * SCALE.get(bench, 1.0)
            for m in fidelity:
                v[f"{ds}/{m}"] = run.metrics["fidelity"][m] * Metric(m, bench).scale
            for m, (_, lo, hi) in cis.items():
                v[f"{ds}/{m}_lo"], v[f"{ds}/{m}_hi"] = lo, hi
            v[f"{ds}/samples"] = run.metrics["counts"]["scored"]
            v[f"{ds}/rel_%"] = _relative(study, ref, ds, run, v.get(f"{ds}/{metric}"))
            if ref is not None and ds in ref.runs:
                ms, ref_ms = (r.metrics["efficiency"].get("prefill_ms_median") for r in (run, ref.runs[ds]))
                v[f"{ds}/speedup"] = ref_ms / ms if ms and ref_ms else None
            if study.published and row.label == row.strategy and bench in PAPER_METRIC:
                v[f"{ds}/paper_{PAPER_METRIC[bench]}"] = published(study.published, row.strategy, row.budget, bench)
        _pool(row)


def _relative(study: Study, ref: Row | None, ds: str, run: Run, value: float | None) -> float | None:
    """100 x the row's headline metric over the unpruned model's on the same dataset."""
    if value is None:
        return None
    metric = study.headline[ds]
    if ref is not None and ds in ref.runs:
        base = ref.runs[ds].metrics["metrics"].get(metric)
        base = None if base is None else base * SCALE.get(study.benchmarks[ds], 1.0)
    else:
        base = _vanilla_value(run, study.benchmarks[ds], metric)
    return 100.0 * value / base if base else None


def _vanilla_value(run: Run, bench: str, metric: str) -> float | None:
    """The unpruned model's metric from the vanilla answers a fidelity run recorded next to its own."""
    scored = run.scored
    if not scored or any("vanilla_prediction" not in r for r in scored):
        return None
    benchmark = get_benchmark(bench)
    vanilla = [r | {"prediction": v, "score": benchmark.score(v, r["answer"])}
               for r in scored for v in [r["vanilla_prediction"]]]
    return Metric(metric, bench).value(vanilla)


def _pool(row: Row) -> None:
    """Row-level tokens, FLOPs and latency over its runs: sample-weighted means; the median of the runs'
    prefill medians; speedup and relative score averaged over datasets (geometric / arithmetic mean)."""
    runs = list(row.runs.values())
    weights = [r.metrics["counts"]["scored"] for r in runs]
    total = sum(weights)
    for group, keys in (("tokens", TOKENS), ("efficiency", FLOPS)):
        for k in keys:
            vals = [r.metrics.get(group, {}).get(k) for r in runs]
            ok = [(x, w) for x, w in zip(vals, weights) if x is not None]
            row.values[k] = sum(x * w for x, w in ok) / sum(w for _, w in ok) if ok and total else None
    medians = [r.metrics.get("efficiency", {}).get("prefill_ms_median") for r in runs]
    medians = [m for m in medians if m is not None]
    row.values["prefill_ms_median"] = statistics.median(medians) if medians else None
    speedups = [row.values.get(f"{ds}/speedup") for ds in row.runs]
    speedups = [s for s in speedups if s]
    row.values["speedup"] = math.exp(statistics.fmean(map(math.log, speedups))) if speedups else None
    rel = [row.values[f"{ds}/rel_%"] for ds in row.runs if row.values.get(f"{ds}/rel_%") is not None]
    row.values["avg_rel_%"] = statistics.fmean(rel) if rel else None


# --- paired tests and gaps ---------------------------------------------------------------------------------
def _pairs(study: Study, resamples: int, seed: int) -> list[dict]:
    """Each two rows at the same budget, and each row against the unpruned one, on the samples both scored."""
    out = []
    for model in study.models:
        rows = study.rows_of(model)
        ref = reference_row(study, model)
        for ds in study.datasets:
            have = [r for r in rows if ds in r.runs and r.runs[ds].scored and not r.reference]
            candidates = [(a, b) for a, b in itertools.combinations(have, 2) if a.budget == b.budget]
            if ref is not None and ds in ref.runs and ref.runs[ds].scored:
                candidates += [(a, ref) for a in have]
            # a random-weight model's benchmark score is noise: test its fidelity to the unpruned model only
            names = ["answer_agreement"] if model in study.random_weights else [study.headline[ds], "answer_agreement"]
            for a, b in candidates:
                ra, rb = a.runs[ds].scored, b.runs[ds].scored
                for name in names:
                    metric = Metric(name, study.benchmarks[ds])
                    if name == "answer_agreement" and not (metric.available(ra) and metric.available(rb)):
                        continue
                    result = paired_test(ra, rb, metric, resamples, seed)
                    if result is not None:
                        out.append({"model": model, "dataset": ds, "metric": name, "a": a.label, "a_budget": a.budget,
                                    "b": b.label, "b_budget": b.budget, **result})
    out.sort(key=lambda p: (p["model"], p["dataset"], p["metric"] == "answer_agreement", -(p["a_budget"] or math.inf)))
    return out


def _gaps(study: Study, expected_known: bool) -> list[str]:
    """Cells of the strategy x budget x dataset grid with no run (the grid is what the sweep holds)."""
    out = []
    for model in study.models:
        rows = [r for r in study.rows_of(model) if not r.reference]
        datasets = [ds for ds in study.datasets if any(ds in r.runs for r in study.rows_of(model))]
        for r in study.rows_of(model):
            budget = "all" if r.reference else r.budget
            out += [f"{r.label} budget={budget} ({model}): no run on {ds}" for ds in datasets if ds not in r.runs]
        if expected_known:
            continue  # multirun.yaml said which jobs exist; the grid may be deliberately sparse
        labels = list(dict.fromkeys(r.label for r in rows))
        budgets = sorted({r.budget for r in rows}, key=lambda b: -(b or math.inf))
        have = {(r.label, r.budget) for r in rows}
        out += [f"{label} budget={b} ({model}): no run (a gap in the strategy x budget grid)"
                for label in labels for b in budgets if (label, b) not in have]
    return out


# --- output ------------------------------------------------------------------------------------------------
def columns(study: Study) -> list[str]:
    first = ["model", "strategy", "label", "budget"]
    seen = list(dict.fromkeys(k for r in study.rows for k in r.values))
    per_ds = [k for ds in study.datasets for k in seen if k.startswith(f"{ds}/")]
    return first + per_ds + [k for k in seen if "/" not in k] + ["runs"]


def write_pairs_csv(study: Study, path) -> None:
    cols = ["model", "dataset", "metric", "a", "a_budget", "b", "b_budget", "n", "value_a", "value_b", "diff",
            "diff_lo", "diff_hi", "p"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(study.pairs)


def write_csv(study: Study, path) -> None:
    cols = columns(study)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        for r in study.rows:
            writer.writerow({"model": r.model, "strategy": r.strategy, "label": r.label, "budget": r.budget,
                             **{k: v for k, v in r.values.items() if v is not None},
                             "runs": "; ".join(run.source for run in r.runs.values())})


def _num(x, digits=1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}f}"


def _ci(v: dict, key: str) -> str:
    lo, hi = v.get(f"{key}_lo"), v.get(f"{key}_hi")
    return _num(v.get(key)) + (f" [{_num(lo)}, {_num(hi)}]" if lo is not None else "")


def markdown(study: Study, title: str = "Comparison") -> str:
    lines = [f"# {title}", ""]
    if not study.rows:
        lines += ["No complete runs: nothing to compare yet.", ""]
    multi_model = len(study.models) > 1
    has = lambda key: any(r.values.get(key) is not None for r in study.rows)  # noqa: E731
    head = (["model"] if multi_model else []) + ["strategy", "budget"]
    for ds in study.datasets:
        metric = study.headline[ds]
        head += [f"{ds} {metric} (95% CI)", f"{ds} rel %"]
        if has(f"{ds}/answer_agreement"):
            head.append(f"{ds} agree % (95% CI)")
        if has(f"{ds}/paper_{PAPER_METRIC.get(study.benchmarks[ds])}"):
            head.append(f"{ds} paper {metric}")
    if len(study.datasets) > 1:
        head.append("avg rel %")
    head += ["n_in", "n_final", "n_avg", "TFLOPs", "TFLOPs (FastV)", "prefill ms", "speedup"]
    body = []
    for r in study.rows:
        v = r.values
        cells = ([r.model] if multi_model else []) + [r.label, "all" if r.reference else _num(r.budget, 0)]
        for ds in study.datasets:
            cells += [_ci(v, f"{ds}/{study.headline[ds]}"), _num(v.get(f"{ds}/rel_%"))]
            if has(f"{ds}/answer_agreement"):
                cells.append(_ci(v, f"{ds}/answer_agreement"))
            paper = f"{ds}/paper_{PAPER_METRIC.get(study.benchmarks[ds])}"
            if has(paper):
                cells.append(_num(v.get(paper)))
        if len(study.datasets) > 1:
            cells.append(_num(v.get("avg_rel_%")))
        cells += [_num(v.get(k)) for k in ("n_in", "n_final", "n_avg")]
        cells += [_sig(v.get("tflops")), _sig(v.get("tflops_fastv")), _num(v.get("prefill_ms_median")),
                  "—" if v.get("speedup") is None else f"{v['speedup']:.2f}x"]
        body.append(cells)
    if study.rows:
        lines += _md_table(head, body) + [""]
        lines.append("Scores in points (MME: score units); [low, high] = 95% bootstrap CI over samples; rel % = 100 x "
                     "score / unpruned score; tokens are means per sample; TFLOPs = prefill, exact count and FastV's "
                     "convention; prefill ms = median over batches; speedup = unpruned prefill / this prefill.")
        if study.published:
            others = [m for m in study.models if m != "llava15_7b"]
            lines.append(f"paper = published numbers, {SOURCES[study.published]}; full benchmarks, budgets in that "
                         "paper's convention: side-by-side reading only" +
                         (f" (these runs are {', '.join(others)}, not llava15_7b)." if others else "."))
        lines.append("")
    if study.pairs:
        lines += ["## Paired tests (same samples)", ""]
        rows = [([p["model"]] if multi_model else []) + [
                 p["dataset"], p["metric"], f"{p['a']} @{_num(p['a_budget'], 0)}",
                 f"{p['b']}" + ("" if p["b_budget"] is None else f" @{_num(p['b_budget'], 0)}"), str(p["n"]),
                 f"{p['diff']:+.2f} [{p['diff_lo']:+.2f}, {p['diff_hi']:+.2f}]", f"{p['p']:.3f}"]
                for p in study.pairs]
        head = (["model"] if multi_model else []) + ["dataset", "metric", "A", "B", "n", "A - B (95% CI)", "p"]
        lines += _md_table(head, rows) + [""]
        lines += ["A - B on the samples both runs scored, in points; CI from a paired bootstrap; p from a "
                  "permutation test swapping A and B per sample (p = 1: no evidence of a difference).", ""]
    if study.missing or study.incomplete:
        lines += ["## Missing or incomplete", ""]
        lines += [f"- incomplete: {x}" for x in study.incomplete] + [f"- missing: {x}" for x in study.missing] + [""]
    if study.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in study.notes] + [""]
    return "\n".join(lines)


def _sig(x) -> str:
    return "—" if x is None else f"{x:.3g}"


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(map(esc, r)) + " |" for r in rows]

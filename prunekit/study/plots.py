"""Plots of a study (PNG, matplotlib): score vs retained tokens, score vs TFLOPs, prefill speedup vs tokens.

One line per strategy label, points at its budgets with their 95% bootstrap CI as error bars (strategies at the
same x are nudged apart by under 1% of the axis, so their bars stay readable); the unpruned run is a dashed
horizontal line (and a star at its own x). Each benchmark gets a panel, and answer agreement
with the unpruned model gets one next to it when the runs measured fidelity (the only meaningful score of a
random-weight model). matplotlib is imported here only (``pip install -e ".[study]"``), through its object API,
so no global pyplot state or display is involved.
"""
from __future__ import annotations

from pathlib import Path

from .table import Study

TOKEN_AXIS = {"n_in": "visual tokens entering the LLM (n_in)",
              "n_final": "visual tokens after the last cut (n_final)",
              "n_avg": "visual tokens, layer average (n_avg)",
              "n_avg_out": "visual tokens, layer average of outputs (n_avg_out)"}
FLOPS_AXIS = {"tflops": "prefill TFLOPs (exact count)", "tflops_fastv": "prefill TFLOPs (FastV's convention)"}


def _figure(panels: int, cols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = -(-panels // cols)
    fig = Figure(figsize=(5.2 * cols, 3.8 * rows), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(panels)]


def _colours(labels: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def _series(study: Study, model: str, x_key: str, y_key: str):
    """Per non-reference label: sorted (x, y, lo, hi) points; and the reference's (x, y) if it has one."""
    lines: dict[str, list] = {}
    ref = None
    for row in study.rows_of(model):
        v = row.values
        x, y = v.get(x_key), v.get(y_key)
        if x is None or y is None:
            continue
        point = (x, y, v.get(f"{y_key}_lo"), v.get(f"{y_key}_hi"))
        if row.reference:
            ref = point
        else:
            lines.setdefault(row.label, []).append(point)
    return {k: sorted(p) for k, p in lines.items()}, ref


def _panel(ax, study: Study, model: str, x_key: str, y_key: str, colours: dict, xlabel: str, ylabel: str,
           title: str) -> bool:
    lines, ref = _series(study, model, x_key, y_key)
    if not lines and ref is None:
        ax.set_axis_off()
        ax.text(0.5, 0.5, f"{title}\nno data", ha="center", va="center", transform=ax.transAxes)
        return False
    all_x = [p[0] for pts in lines.values() for p in pts] + ([ref[0]] if ref else [])
    nudge = 0.008 * (max(all_x) - min(all_x))
    for i, (label, pts) in enumerate(lines.items()):
        xs = [p[0] + (i - (len(lines) - 1) / 2) * nudge for p in pts]
        ys = [p[1] for p in pts]
        if all(p[2] is not None for p in pts):
            err = [[y - p[2] for y, p in zip(ys, pts)], [p[3] - y for y, p in zip(ys, pts)]]
            ax.errorbar(xs, ys, yerr=err, marker="o", ms=5, capsize=3, lw=1.6, color=colours[label], label=label)
        else:
            ax.plot(xs, ys, marker="o", ms=5, lw=1.6, color=colours[label], label=label)
    if ref is not None:
        ax.axhline(ref[1], color="0.4", ls="--", lw=1, label="unpruned (keep_all)")
        ax.plot([ref[0]], [ref[1]], marker="*", ms=11, color="0.25", ls="none")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return True


def write_plots(study: Study, out_dir: Path, tokens: str = "n_avg",
                flops: str = "tflops") -> tuple[list[Path], list[str]]:
    """The three figures per model; returns the files written and notes on what was left out."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written, notes = [], []
    for model in study.models:
        suffix = "" if len(study.models) == 1 else f"_{model}"
        labels = list(dict.fromkeys(r.label for r in study.rows_of(model) if not r.reference))
        colours = _colours(labels)
        random = model in study.random_weights
        datasets = [ds for ds in study.datasets if any(ds in r.runs for r in study.rows_of(model))]
        for x_key, xlabel, name in ((tokens, TOKEN_AXIS.get(tokens, tokens), "score_vs_tokens"),
                                    (flops, FLOPS_AXIS.get(flops, flops), "score_vs_tflops")):
            panels = []
            for ds in datasets:
                metric = study.headline[ds]
                if not random:  # a random-weight model's score is noise: its agreement panel says everything
                    panels.append((f"{ds}/{metric}", f"{metric} (points)" if study.benchmarks[ds] != "mme" else metric,
                                   f"{model} · {ds}: {metric}"))
                if any(r.values.get(f"{ds}/answer_agreement") is not None for r in study.rows_of(model)):
                    panels.append((f"{ds}/answer_agreement", "answer agreement with unpruned (%)",
                                   f"{model} · {ds}: agreement with the unpruned model"))
            if not panels:
                continue
            fig, axes = _figure(len(panels), min(2, len(panels)))
            for ax, (y_key, ylabel, title) in zip(axes, panels):
                _panel(ax, study, model, x_key, y_key, colours, xlabel, ylabel, title)
            path = out_dir / f"{name}{suffix}.png"
            fig.savefig(path)
            written.append(path)
        if not any(r.values.get("speedup") for r in study.rows_of(model)):
            notes.append(f"{model}: no unpruned (keep_all) run, so no speedup plot")
            continue
        fig, axes = _figure(len(datasets), min(2, len(datasets)))
        for ax, ds in zip(axes, datasets):
            _panel(ax, study, model, tokens, f"{ds}/speedup", colours, TOKEN_AXIS.get(tokens, tokens),
                   "prefill speedup over unpruned (x)", f"{model} · {ds}: prefill speedup (median over batches)")
        path = out_dir / f"speedup_vs_tokens{suffix}.png"
        fig.savefig(path)
        written.append(path)
    return written, notes

"""Does a study rank the strategies as the papers do? Spearman's rho against the published LLaVA-1.5-7B ranking.

The published score of a method at a budget is its mean relative score over every (source, benchmark) cell
of ``published.py`` that has it: value / the same source's unpruned value on that benchmark, so sources and
benchmarks of different scales weigh the same. The study's score is each row's headline metric (first
dataset). rho is Pearson's correlation of the two rankings, ties taking their mean rank (docs/compare.md).
"""
from __future__ import annotations

import numpy as np

from .published import PAPER_METRIC, published_table
from .table import UNPRUNED, Study


def published_scores(budget: int) -> dict[str, float]:
    """method -> mean relative score (x100) over the published cells at ``budget``."""
    table = published_table()
    unpruned = {r["source"]: r for r in table if r["method"] == UNPRUNED}
    cells: dict[str, list[float]] = {}
    for r in table:
        if r["budget"] != budget or r["method"] == UNPRUNED:
            continue
        for bench in PAPER_METRIC:
            ref = unpruned.get(r["source"], {}).get(bench)
            if r[bench] is not None and ref:
                cells.setdefault(r["method"], []).append(100.0 * r[bench] / ref)
    return {m: float(np.mean(v)) for m, v in sorted(cells.items())}


def ranks(values: list[float]) -> np.ndarray:
    """1-based ranks, largest value first; tied values share their mean rank."""
    v = np.asarray(values, float)
    order = np.argsort(-v, kind="stable")
    out = np.empty(len(v))
    out[order] = np.arange(1, len(v) + 1)
    for x in np.unique(v):
        tied = v == x
        out[tied] = out[tied].mean()
    return out


def spearman(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"Spearman's rho needs two equally long lists of at least 2 values, got {len(a)} and {len(b)}")
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        raise ValueError("Spearman's rho is undefined when every value of one list is tied")
    return float(np.corrcoef(ra, rb)[0, 1])


def ranking_report(study: Study, budget: int) -> str:
    """Markdown: the study's and the papers' scores at ``budget``, rho over the methods that have both."""
    ds = study.datasets[0] if study.datasets else None
    ours = {row.strategy: row.values.get(f"{ds}/{study.headline[ds]}") for row in study.rows
            if ds and row.budget == budget and row.label == row.strategy and not row.reference}
    ours = {k: v for k, v in ours.items() if v is not None}
    paper = published_scores(budget)
    both = sorted(set(ours) & set(paper), key=lambda m: -paper[m])
    lines = [f"## Ranking at {budget} tokens against the published LLaVA-1.5-7B ranking", "",
             f"Study: {ds} {study.headline.get(ds)}; papers: mean relative score over prunekit/study/published.py.", "",
             "| strategy | study | study rank | papers (rel. %) | papers rank |", "|---|---|---|---|---|"]
    if len(both) >= 2:
        r_ours, r_paper = ranks([ours[m] for m in both]), ranks([paper[m] for m in both])
        for m, a, b in zip(both, r_ours, r_paper):
            lines.append(f"| {m} | {ours[m]:.1f} | {a:g} | {paper[m]:.1f} | {b:g} |")
        lines += ["", f"Spearman's rho over {len(both)} strategies: **{spearman([ours[m] for m in both], [paper[m] for m in both]):.2f}**"]
    else:
        lines += ["", f"fewer than two strategies have both a study score and a published number at {budget} tokens"]
    without = sorted(set(ours) - set(paper))
    if without:
        lines += ["", f"No published number at {budget} tokens (left out of rho): {', '.join(without)}"]
    return "\n".join(lines) + "\n"

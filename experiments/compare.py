"""Compare the runs of a sweep: table (Markdown + CSV), bootstrap CIs and paired tests, plots, kept-token overlays.

    python experiments/compare.py outputs/sweeps/sweep                       # -> outputs/sweeps/sweep/compare/
    python experiments/compare.py outputs/sweeps/budgets --published flowcut_tab1 --wandb
    python experiments/compare.py wandb:my-team/prunekit --wandb-group budgets -o compare-budgets

A partial sweep is fine: the table shows what finished and lists what is missing or incomplete.
See docs/compare.md for the outputs and the statistics.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from prunekit.study.published import SOURCES  # noqa: E402

TOKENS = ("n_avg", "n_in", "n_final", "n_avg_out")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", help="sweep or run directories, or wandb:<entity>/<project>")
    p.add_argument("-o", "--out", help="output folder (default: <first directory>/compare, or ./compare for W&B)")
    p.add_argument("--published", choices=sorted(SOURCES), help="add a paper's published numbers side by side")
    p.add_argument("--rank-published", type=int, metavar="BUDGET",
                   help="rank the strategies at BUDGET tokens against the published LLaVA-1.5-7B ranking (ranking.md)")
    p.add_argument("--metric", action="append", default=[], metavar="DATASET=METRIC",
                   help="the headline metric of a dataset (default: POPE f1, MME total, GQA/TextVQA accuracy)")
    p.add_argument("--tokens", choices=TOKENS, default="n_avg", help="token count on the plots' x axis")
    p.add_argument("--flops", choices=("tflops", "tflops_fastv"), default="tflops", help="FLOPs convention plotted")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap / permutation resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overlay-samples", type=int, default=4, help="pictures per overlay grid")
    p.add_argument("--overlay-uids", help="comma-separated sample uids to draw instead of the first ones")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-overlays", action="store_true")
    p.add_argument("--wandb", action="store_true", help="also log the table, tests, charts and pictures to W&B")
    p.add_argument("--wandb-project", default="prunekit")
    p.add_argument("--wandb-entity")
    p.add_argument("--wandb-group", help="with a wandb: source, only the runs of this W&B group")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the table")
    args = p.parse_args(argv)
    if args.resamples < 1:
        p.error("--resamples must be at least 1")
    try:
        args.metric = dict(m.split("=", 1) for m in args.metric)
    except ValueError:
        p.error("--metric takes DATASET=METRIC, e.g. --metric pope=accuracy")
    return args


def collect(args):
    from prunekit.study.collect import Sweep, read_sweep
    from prunekit.study.wandb_io import read_wandb

    dirs = [s for s in args.sources if not s.startswith("wandb:")]
    parts = [read_sweep(*dirs)] if dirs else []
    for s in args.sources:
        if s.startswith("wandb:"):
            group = {"group": args.wandb_group} if args.wandb_group else None
            parts.append(read_wandb(s[len("wandb:"):], filters=group))
    merged = Sweep([], [], [], [], [])
    for part in parts:
        merged.runs += part.runs
        merged.incomplete += part.incomplete
        merged.missing += part.missing
        merged.notes += part.notes
        merged.sources += part.sources
        merged.expected_known |= part.expected_known
    return merged, Path(args.out) if args.out else (Path(dirs[0]) / "compare" if dirs else Path("compare"))


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from prunekit.study.table import build_study, markdown, write_csv, write_pairs_csv

    try:
        sweep, out = collect(args)
    except FileNotFoundError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    study = build_study(sweep, args.resamples, args.seed, args.published, args.metric)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    drawing = not (args.no_plots and args.no_overlays) and study.rows
    if drawing and importlib.util.find_spec("matplotlib") is None:
        study.notes.append('matplotlib is not installed (pip install -e ".[study]"): no plots or overlays')
        drawing = False
    if drawing and not args.no_plots:
        from prunekit.study.plots import write_plots

        files, notes = write_plots(study, out / "plots", args.tokens, args.flops)
        images += files
        study.notes += notes
    if drawing and not args.no_overlays:
        from prunekit.study.overlays import write_overlays

        uids = args.overlay_uids.split(",") if args.overlay_uids else None
        files, notes = write_overlays(study, out / "overlays", args.overlay_samples, uids)
        images += files
        study.notes += notes
    text = markdown(study, f"Comparison: {', '.join(sweep.sources) or 'no sources'}")
    if args.rank_published is not None:
        from prunekit.study.ranking import ranking_report

        ranking = ranking_report(study, args.rank_published)
        (out / "ranking.md").write_text(ranking)
        text += "\n" + ranking
    (out / "table.md").write_text(text)
    write_csv(study, out / "table.csv")
    write_pairs_csv(study, out / "pairs.csv")
    if args.wandb:
        from prunekit.study.wandb_io import log_study

        logging.getLogger("prunekit").setLevel(logging.INFO)
        log_study(study, images, out, args.wandb_project, args.wandb_entity, f"compare-{out.resolve().parent.name}",
                  args.tokens)
    if not args.quiet:
        print(text)
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'pairs.csv'}" +
          (f" and {len(images)} pictures under {out}" if images else ""))
    if not study.rows:
        print("warning: no complete runs to compare", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

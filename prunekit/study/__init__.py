"""Comparative studies of a sweep: table (Markdown / CSV), uncertainty, plots, kept-token overlays, W&B.

``experiments/compare.py`` is the command line; docs/compare.md describes the outputs and statistics.
matplotlib (plots, overlays) and wandb are imported only where they are used.
"""
from .collect import Run, Sweep, read_sweep
from .stats import Metric, bootstrap_ci, paired_test
from .table import Study, build_study, markdown, write_csv, write_pairs_csv

__all__ = ["Metric", "Run", "Study", "Sweep", "bootstrap_ci", "build_study", "markdown", "paired_test", "read_sweep",
           "write_csv", "write_pairs_csv"]

"""The speed benchmark (experiments/bench.py): model shapes, the oracle floor, timing, the runner."""

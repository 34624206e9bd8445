"""Evaluation: benchmark data and metrics, the Lightning module, loggers, and the Hydra runner's pieces."""

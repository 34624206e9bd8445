"""Train the pocket VLM (docs/pocket.md): LLaVA-1.5's two stages on generated scenes, on a CPU.

    python experiments/train_pocket.py                                  # the shipped checkpoint's recipe
    python experiments/train_pocket.py stage1.steps=300 stage2.steps=600 save_to=/tmp/pocket
    cp -r outputs/pocket/<run>/checkpoint/* prunekit/pocket/checkpoint/ # ship a retrained model (once)

Seeded and reproducible; progress bars; W&B (offline without a key) or CSV curves in the run directory.
"""
import logging
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # lightning 2.6 + torch 2.13, harmless
log = logging.getLogger("prunekit")


@hydra.main(version_base="1.3", config_path="../configs", config_name="train_pocket")
def main(cfg: DictConfig) -> None:
    from prunekit.eval.loggers import build_loggers
    from prunekit.pocket.training import train

    logging.getLogger("prunekit").setLevel(logging.INFO)
    started = time.time()
    path = train(cfg, build_loggers(cfg, Path(cfg.output_dir), name="train-pocket"))
    print(f"pocket checkpoint: {path} ({(time.time() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()

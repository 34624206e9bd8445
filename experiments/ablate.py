"""Ablation runner: evaluate a pruning strategy on a benchmark; sweep with ``-m``.

    python experiments/ablate.py strategy=flowcut                       # embedded default: tiny model, bundled data
    python experiments/ablate.py strategy=flowcut strategy.relay=mean_query budget=128 \
        model=llava15_7b data=pope data.root=/data/lmms-lab trainer=gpu
    python experiments/ablate.py -m strategy=flowcut,random budget=64,128,192
    python experiments/ablate.py -m experiment=flowcut_tab10_history data=pope data.root=...
    python experiments/ablate.py strategy=my_method plugins=[my_pkg.my_module]

Each run writes config.yaml, metrics.json and predictions.jsonl to its output directory.
"""
import logging
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from prunekit.eval import cli  # noqa: E402

cli.prepare()
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # lightning 2.6 + torch 2.13, harmless


@hydra.main(version_base="1.3", config_path="../configs", config_name="ablate")
def main(cfg: DictConfig) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    from prunekit.eval.run import evaluate

    logging.getLogger("prunekit").setLevel(logging.INFO)
    logging.getLogger("lightning.pytorch").propagate = False  # it prints its own lines; Hydra's handler would repeat them
    results = evaluate(cfg, HydraConfig.get().runtime.output_dir)
    rank_zero_only(print)(cli.summary_line(results))


if __name__ == "__main__":
    main()

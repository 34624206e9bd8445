"""BenchmarkDataModule: one LightningDataModule for every benchmark layout (``data.py`` reads them)."""
from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from ..pocket.data import pocket_data_dir
from .data import collate_samples, load_benchmark, synthetic_pope_dir

EMBEDDED = {"pope": synthetic_pope_dir, "pocket": pocket_data_dir}  # generated sets, built once and cached


class BenchmarkDataModule(L.LightningDataModule):
    """``benchmark`` names the layout and metrics (pope, mme, gqa, textvqa, muirbench, videomme); ``root`` the local
    folder; ``frames`` a video benchmark's frames per video (None: its default).

    ``synthetic=True`` uses the benchmark's generated set (the small POPE-layout one, or the pocket VQA split),
    built once and cached, so a fresh machine runs end to end; ``limit`` keeps the first rows for quick runs.
    """

    def __init__(self, benchmark: str, root: str | None = None, split: str | None = None, limit: int | None = None,
                 batch_size: int = 1, num_workers: int = 0, synthetic: bool = False, frames: int | None = None):
        super().__init__()
        if synthetic and benchmark not in EMBEDDED:
            raise ValueError(f"data.synthetic=true: there is no generated {benchmark} set; generated sets: "
                             f"{sorted(EMBEDDED)}. Set data.synthetic=false and data.root to the local parquet folder")
        if root is None and not synthetic:
            raise ValueError(f"data.root is not set: point it at the local {benchmark} parquet folder, e.g. "
                             f"data={benchmark} data.root=/data/lmms-lab (see docs/evaluation.md for the layouts)")
        self.benchmark, self.root, self.split, self.limit = benchmark, root, split, limit
        self.batch_size, self.num_workers, self.synthetic = batch_size, num_workers, synthetic
        self.frames = frames
        self.dataset = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            root = self.root if self.root is not None else EMBEDDED[self.benchmark]()
            self.dataset = load_benchmark(self.benchmark, root, split=self.split, limit=self.limit, frames=self.frames)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=collate_samples, persistent_workers=False)

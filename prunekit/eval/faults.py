"""A job killed mid-run, on purpose and deterministically, so that resuming a sweep can be tested.

``PRUNEKIT_KILL_AFTER_SAMPLES=N`` makes an evaluation kill its own process (SIGKILL: no clean-up, no finished
files, as a pre-empted Slurm job dies) once N samples are answered; ``PRUNEKIT_KILL_ONLY=<text>`` limits that to
runs whose output directory's name contains the text. Unset, nothing happens.
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import lightning as L

log = logging.getLogger("prunekit")

AFTER = "PRUNEKIT_KILL_AFTER_SAMPLES"
ONLY = "PRUNEKIT_KILL_ONLY"


class KillAfterSamples(L.Callback):
    def __init__(self, samples: int):
        self.samples = samples
        self.seen = 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.seen += len(batch)
        if self.seen >= self.samples:
            log.warning("killed after %d samples (%s)", self.seen, AFTER)  # the test reads this line in the job's log
            for handler in logging.getLogger().handlers + log.handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def fault_callbacks(output_dir: Path) -> list[L.Callback]:
    """The kill switch for this run, when the environment asks for one."""
    after = os.environ.get(AFTER)
    if not after or os.environ.get(ONLY, "") not in output_dir.name:
        return []
    return [KillAfterSamples(int(after))]

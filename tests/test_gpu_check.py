"""scripts/gpu_check.py in its dry mode (CPU, tiny shapes): the steps a GPU box runs, with Hydra, omegaconf and W&B
made unimportable, as on an offline GPU machine that lacks them."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_writes_the_report_without_hydra_omegaconf_or_wandb(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("hydra", "omegaconf", "wandb"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is not installed on this box')\n")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(blocked), str(ROOT)]), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry", "--out", str(tmp_path / "out")],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    report = (tmp_path / "out" / "results.md").read_text()
    assert "## tests: ok" in report and "## doctor: ok" in report and "## speed: ok" in report
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| llava")]
    measured = {(r[0].strip("| "), r[1], r[2]) for r in rows}
    for shape in ("llava15_tiny", "llava_next_tiny"):
        for batch in ("1", "2"):
            assert {(shape, batch, s) for s in ("vanilla", "flowcut", "fastv", "visionzip")} <= measured
    assert all(float(r[7]) > 0 for r in rows)  # pruned_over_oracle measured in every row

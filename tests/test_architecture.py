"""The architecture holds: dependencies point one way (import-linter), files stay small, the wheel installs one
top-level package, and the core runs without Hydra."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import prunekit

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500


def test_import_contracts_hold():
    """pyproject's [tool.importlinter] contracts: the layers, no cycle, no transformers in the contract or the
    strategies, no Hydra / omegaconf in the core."""
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "4 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("folder", ["prunekit", "strategies"])
def test_no_source_file_is_over_500_lines(folder):
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / folder).rglob("*.py"))
            if not p.is_relative_to(ROOT / "prunekit" / "strategies")
            and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these files (one job per file): {long}"


def test_the_core_attaches_and_prunes_without_hydra_or_omegaconf(tmp_path):
    script = tmp_path / "bare.py"
    script.write_text('''
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("hydra", "omegaconf"):
            raise ImportError(f"{name} is blocked: a bare GPU box has no Hydra")
sys.meta_path.insert(0, Block())
import prunekit, prunekit.doctor, prunekit.bench.runner, prunekit.bench.oracle
from prunekit.tiny import build_tiny_llava, synthetic_image
model, processor = build_tiny_llava()
text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                     add_generation_prompt=True)
x = processor(images=[synthetic_image(0)], text=[text], return_tensors="pt")
with prunekit.attach(model, "fastv", budget=8) as handle:
    model.generate(**x, max_new_tokens=2)
assert handle.trace.n_final == [8], handle.trace.n_final
assert not any(m.split(".")[0] in ("hydra", "omegaconf") for m in sys.modules)
print("bare ok", prunekit.list_strategies())
''')
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bare ok" in proc.stdout and "flowcut" in proc.stdout


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_package_and_lists_the_strategies(tmp_path):
    """Built from the checkout, installed (no deps) into a fresh venv outside it, which borrows this venv's
    dependencies (torch, transformers) through a .pth path but not its editable prunekit."""
    import sysconfig

    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("prunekit-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"prunekit"}, top
    assert "prunekit/strategies/flowcut.py" in names and not any(n.startswith("strategies/") for n in names)
    assert "prunekit/configs/strategy/flowcut.yaml" in names and "prunekit/configs/ablate.yaml" in names
    assert "prunekit/configs/hydra/launcher/slurm.yaml" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = ("import sys, prunekit; assert prunekit.__file__.startswith(sys.argv[1]), prunekit.__file__; "
            "from prunekit.eval.cli import strategy_node; from prunekit.eval.run import git_revision; "
            "print(prunekit.list_strategies(), strategy_node('flowcut')['budget'], git_revision())")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(python), "-c", code, site], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'flowcut'" in proc.stdout and "'visionzip'" in proc.stdout
    assert proc.stdout.strip().endswith(f"64 prunekit {prunekit.__version__} (installed, no checkout)")  # budget: flowcut.yaml

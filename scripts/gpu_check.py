"""The GPU check: one command for a machine with one H100 / H200 (about 8 minutes), or a dry run on a CPU.

    python scripts/gpu_check.py                 # CUDA tests, the doctor, the speed table -> gpu_check/<time>/results.md
    python scripts/gpu_check.py --dry           # the same steps on the CPU at tiny shapes (CI runs it)

Steps, each timed and reported in results.md:

1. versions and the device;
2. the CUDA tests (``pytest -m cuda``; skipped where pytest is not installed);
3. ``python -m prunekit.doctor`` (the runtime contract on every family's tiny twin, on this device, in bf16);
4. the speed table: LLaVA-1.5-7B and LLaVA-NeXT-7B shapes (random weights, built directly on the GPU, bf16,
   sdpa) for vanilla, FlowCut, FastV and VisionZip against the oracle floor, at batch 1 and 16
   (prunekit/bench, docs/benchmarks.md).

It needs torch, transformers and prunekit only: no Hydra, omegaconf or W&B, so it runs on an offline GPU box where
those are missing (docs/benchmarks.md, "The GPU run": how to carry the wheels there).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

FULL = dict(shapes=["llava15_7b", "llava_next_7b"], batch_sizes=[1, 16], budgets={"llava15": [64], "llava_next": [160]},
            repeats=5, warmup=2, new_tokens=8)
DRY = dict(shapes=["llava15_tiny", "llava_next_tiny"], batch_sizes=[1, 2], budgets={"llava15": [16], "llava_next": [40]},
           repeats=1, warmup=0, new_tokens=2)
STRATEGIES = ["flowcut", "fastv", "visionzip"]  # the paper's comparison (FlowCut Tab. 5: 64 on LLaVA-1.5, 160 on NeXT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU, tiny shapes, one round: checks that the script runs")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default gpu_check/<date>_<time>)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["tests", "doctor", "speed"], help="steps to leave out")
    args = ap.parse_args(argv)
    import torch

    if not args.dry and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --dry on a CPU")
    out = args.out or ROOT / "gpu_check" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.dry else "cuda"
    report = [f"# prunekit GPU check{' (dry run on the CPU)' if args.dry else ''}", "", *versions(device), ""]
    failed = []
    for name, step in (("tests", cuda_tests), ("doctor", doctor), ("speed", speed)):
        if name in args.skip:
            report += [f"## {name}: skipped (--skip)", ""]
            continue
        start = time.perf_counter()
        ok, text = step(device, out, args.dry)
        report += [f"## {name}: {'ok' if ok else 'FAILED'} ({time.perf_counter() - start:.0f} s)", "", text, ""]
        failed += [] if ok else [name]
        print(f"{name}: {'ok' if ok else 'FAILED'}", flush=True)
    (out / "results.md").write_text("\n".join(report))
    print(f"wrote {out / 'results.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def versions(device: str) -> list[str]:
    import torch
    import transformers

    gpu = torch.cuda.get_device_name() if device == "cuda" else "none (dry run)"
    return [f"- device: {gpu}", f"- torch {torch.__version__}, CUDA {torch.version.cuda}",
            f"- transformers {transformers.__version__}", f"- python {sys.version.split()[0]}"]


def _run(command: list[str]) -> tuple[bool, str]:
    proc = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc.returncode == 0, "```\n" + "\n".join(proc.stdout.strip().splitlines()[-25:]) + "\n```"


def cuda_tests(device: str, out: Path, dry: bool) -> tuple[bool, str]:
    if importlib.util.find_spec("pytest") is None:
        return True, "pytest is not installed here: the CUDA tests were not run"
    # the cuda-marked tests live in one file, so a box without Hydra (which other test files import) collects them;
    # Hydra's own pytest plugin is not needed either
    ok, text = _run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider",
                     "-p", "no:hydra_pytest"])
    return ok or "no tests ran" in text, text


def doctor(device: str, out: Path, dry: bool) -> tuple[bool, str]:
    families = ["--families", "llava-1.5"] if dry else []
    return _run([sys.executable, "-m", "prunekit.doctor", "--device", device, *families])


def speed(device: str, out: Path, dry: bool) -> tuple[bool, str]:
    import torch

    from prunekit.bench.runner import markdown, run

    plan = DRY if dry else FULL
    rows = run(plan["shapes"], plan["batch_sizes"], STRATEGIES, plan["budgets"], device,
               torch.float32 if dry else torch.bfloat16, "sdpa", plan["repeats"], plan["warmup"], plan["new_tokens"],
               reference_style=False, out=out)
    (out / "speed.json").write_text(json.dumps(rows, indent=1))
    measured = [r for r in rows if "refused" not in r]
    return len(measured) == len(rows), markdown(rows)


if __name__ == "__main__":
    sys.exit(main())

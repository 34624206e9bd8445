"""Speed benchmark: prefill / generate latency, decode rate, peak memory, the oracle floor, scoring overhead
and the reference-style (eager, full attention maps) comparison, for vanilla and every strategy x budget.

    python experiments/bench.py                                        # the machine's default set
    python experiments/bench.py shapes=[llava15_7b,llava_next_7b] batch_sizes=[1,16]
    python experiments/bench.py shapes=[llava15_cpu] batch_sizes=[1] strategies=[flowcut] repeats=5

Writes results.jsonl (one row per measurement, as it goes) and results.md to output_dir; see docs/benchmarks.md.
"""
import logging
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="bench")
def main(cfg: DictConfig) -> None:
    import torch
    import transformers

    from prunekit.bench.runner import markdown, run

    logging.getLogger("prunekit").setLevel(logging.INFO)
    cuda = torch.cuda.is_available()
    device = ("cuda" if cuda else "cpu") if cfg.device == "auto" else cfg.device
    on_gpu = device.startswith("cuda")
    dtype = {"auto": torch.bfloat16 if on_gpu else torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[cfg.dtype]
    shapes = cfg.shapes or (["llava15_7b", "llava_next_7b", "qwen2_vl_7b"] if on_gpu else ["llava15_cpu", "llava_next_cpu"])
    batches = cfg.batch_sizes or ([1, 16] if on_gpu else [1, 4])
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"device": torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()}, "
               f"{torch.get_num_threads()} threads)", "dtype": str(dtype).replace("torch.", ""),
               "torch": torch.__version__, "transformers": transformers.__version__}
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg) + f"# {machine}\n")
    rows = run(shapes, batches, OmegaConf.to_container(cfg.strategies, resolve=True),
               OmegaConf.to_container(cfg.budgets, resolve=True), device, dtype, cfg.attn_implementation,
               cfg.repeats, cfg.warmup, cfg.new_tokens, cfg.reference_style, out)
    table = markdown(rows)
    (out / "results.md").write_text(f"{machine}\n\n{table}")
    print(machine)
    print(table)


if __name__ == "__main__":
    main()

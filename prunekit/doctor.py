"""``python -m prunekit.doctor``: is this install (torch, transformers, device, dtype) one prunekit serves correctly?

Prints the library versions, the device and the attention backends found, then runs the runtime contract on
the tiny twin of every model family, on the chosen device and dtype:

  keep_all == vanilla     the full gather / mask / position machinery changes nothing
  detach restores         no hook left, logits after detach() equal a model never attached (bit for bit, or
                          within the rounding of kernels that depend on buffer alignment: 1e-5 in fp32)
  prunes in prefill       FastV leaves n_final = budget < n_vanilla visual tokens, n_in > 0
  cache == recompute      cached greedy decoding equals no-cache recomputation with the decisions replayed
  padded batch == rows    a left-padded batch of two gives each row's result alone

A pass/fail table follows; the exit status is 1 when any check fails. fp32 checks are exact (tokens) or to 1e-4
(logits); half precision compares the first step's logits to 5e-2, since a random tiny model's near-uniform
logits flip argmaxes under rounding and the later steps then diverge.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

import prunekit
from prunekit import compat
from prunekit.errors import PruningError

FAMILIES = {"llava-1.5": "tiny", "llava-next": "tiny-next", "qwen2-vl": "tiny-qwen2-vl", "qwen2.5-vl": "tiny-qwen2.5-vl",
            "internvl": "tiny-internvl", "qwen3-vl": "tiny-qwen3-vl", "llava-onevision": "tiny-onevision",
            "qwen3.5": "tiny-qwen3.5"}
QUESTIONS = ["Is there a red box in the image?", "How many shapes can you see in this small picture?"]
IMAGE_SIZES = [(224, 224), (200, 150)]
BUDGET, STEPS = 8, 3
# the pruning strategy of each check: FastV inside the LLM, except where the LLM takes no cut (Qwen3.5's hybrid LM)
PROBES = {"qwen3.5": {"name": "random", "budget": BUDGET, "stage": "projector_output"}}


@dataclass
class Check:
    family: str
    name: str
    ok: bool
    detail: str


def environment(device: torch.device) -> list[str]:
    import transformers.utils as tu

    lines = [f"prunekit {prunekit.__version__}",
             f"torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'})",
             f"transformers {compat.transformers_version()} "
             + ("(in the tested range " if compat.in_tested_range() else "(OUTSIDE the tested range ")
             + f"transformers{compat.TESTED_RANGE})"]
    if torch.cuda.is_available():
        lines.append(f"CUDA {torch.version.cuda}: {torch.cuda.device_count()} GPU(s), using "
                     f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'none (device is cpu)'}")
    else:
        lines.append("CUDA: not available (CPU only)")
    backends = ["eager", "sdpa"]
    for name, probe in (("flash_attention_2", "is_flash_attn_2_available"), ("flash_attention_3", "is_flash_attn_3_available"),
                        ("flex_attention", "is_torch_flex_attn_available")):
        if getattr(tu, probe, lambda: False)():
            backends.append(name)
    lines.append("attention backends: " + ", ".join(backends))
    return lines


def _prompts(processor, n):
    return [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}],
        add_generation_prompt=True) for i in range(n)]


def _inputs(processor, rows, device):
    from prunekit.tiny import synthetic_image

    texts = _prompts(processor, max(rows) + 1)
    images = [synthetic_image(100 + i, IMAGE_SIZES[i % len(IMAGE_SIZES)]) for i in rows]
    x = processor(images=images, text=[texts[i] for i in rows], return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in x.items()}


def _greedy(model, x):
    out = model.generate(**x, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[:, x["input_ids"].shape[1]:], torch.stack(out.logits, 1).float()


def _recompute(model, x, generated):
    """Last-position logits of one no-cache forward over the prompt plus ``generated``."""
    ids = torch.cat([x["input_ids"], generated], 1)
    mask = torch.cat([x["attention_mask"], torch.ones_like(generated)], 1)
    extra = {k: x[k] for k in ("pixel_values", "image_sizes", "image_grid_thw") if k in x}
    if "mm_token_type_ids" in x:  # Qwen: M-RoPE positions from the ids
        extra["mm_token_type_ids"] = torch.cat([x["mm_token_type_ids"], torch.zeros_like(generated)], 1)
    else:  # the positions generate derives from a left-padded mask
        extra["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits[:, -1].float()


class _Compare:
    def __init__(self, dtype: torch.dtype):
        self.exact = dtype == torch.float32
        self.atol = 1e-4 if self.exact else 5e-2

    def logits(self, a, b) -> tuple[bool, str]:
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        return diff <= self.atol, f"max |Δlogit| {diff:.2e} (tol {self.atol:g})"

    def restored(self, a, b) -> tuple[bool, str]:
        diff = float((a - b).abs().max())
        tol = 1e-5 if self.exact else self.atol
        return diff <= tol, f"max |Δlogit| {diff:.2e} (tol {tol:g}: rounding of the platform's kernels only)"

    def run(self, tokens_a, logits_a, tokens_b, logits_b) -> tuple[bool, str]:
        """Two greedy runs: every step's logits and the tokens in fp32; in half precision the first step's logits
        (a near-tie may pick another token under rounding, and the later steps then diverge legitimately)."""
        if self.exact:
            ok, detail = self.logits(logits_a, logits_b)
            same = torch.equal(tokens_a, tokens_b)
            return ok and same, detail + ("" if same else "; tokens differ")
        ok, detail = self.logits(logits_a[:, 0], logits_b[:, 0])
        return ok, detail + " (first step)"


def check_family(family: str, device: torch.device, dtype: torch.dtype) -> list[Check]:
    from prunekit.loading import load_model
    from prunekit.tiny import tiny_model_dir

    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    model, processor = load_model(str(tiny_model_dir(FAMILIES[family])), dtype=name)
    model.to(device)
    cmp, checks = _Compare(dtype), []

    def record(check: str, fn):
        try:
            ok, detail = fn()
        except Exception as e:  # a crash is a failed check, reported with its reason
            ok, detail = False, f"{type(e).__name__}: {str(e)[:160]}"
        checks.append(Check(family, check, ok, detail))

    pair = _inputs(processor, [0, 1], device)
    probe = PROBES.get(family, {"name": "fastv", "budget": BUDGET})
    with torch.inference_mode():
        vanilla_logits = model(**pair).logits.float()
        vanilla = _greedy(model, pair)

        def keep_all():
            with prunekit.attach(model, "keep_all"):
                return cmp.run(*_greedy(model, pair), *vanilla)

        def detach_restores():
            handle = prunekit.attach(model, probe)
            _greedy(model, pair)
            handle.detach()
            after = model(**pair).logits.float()
            if "generate" in model.__dict__ or handle.attached:
                return False, "a hook or the generate wrapper is left"
            if torch.equal(after, vanilla_logits):
                return True, "bit-identical logits"
            # CPU BLAS kernels may round differently with the buffers' alignment: allow that, and no more
            return cmp.restored(after, vanilla_logits)

        def prunes():
            with prunekit.attach(model, probe) as handle:
                _greedy(model, pair)
                trace = handle.trace
            ok = all(0 < i and f == BUDGET < v for i, f, v in zip(trace.n_in, trace.n_final, trace.n_vanilla))
            return ok, f"n_vanilla {trace.n_vanilla} n_in {trace.n_in} n_final {trace.n_final}"

        def cache_equals_recompute():
            with prunekit.attach(model, probe) as handle:
                tokens, logits = _greedy(model, pair)
                with handle.replay():
                    again = torch.stack([_recompute(model, pair, tokens[:, :t]) for t in range(STEPS)], 1)
            return cmp.logits(logits, again)

        def padded_batch():
            with prunekit.attach(model, probe):
                tokens, logits = _greedy(model, pair)
                alone = [_greedy(model, _inputs(processor, [i], device)) for i in (0, 1)]
            return cmp.run(tokens, logits, torch.cat([a[0] for a in alone]), torch.cat([a[1] for a in alone]))

        record("keep_all == vanilla", keep_all)
        record("detach restores", detach_restores)
        record("prunes in prefill", prunes)
        record("cache == recompute", cache_equals_recompute)
        record("padded batch == rows", padded_batch)
    return checks


def table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'family':<11} {'check':<{width}}  result  detail", "-" * (width + 40)]
    lines += [f"{c.family:<11} {c.name:<{width}}  {'pass' if c.ok else 'FAIL':<6}  {c.detail}" for c in checks]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prunekit.doctor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    args = ap.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    print("\n".join(environment(device)))
    print(f"contract on the tiny twins: device {device}, dtype {str(dtype).replace('torch.', '')}\n")
    start, checks = time.perf_counter(), []
    for family in args.families:
        try:
            checks += check_family(family, device, dtype)
        except (PruningError, OSError, RuntimeError, ValueError) as e:
            checks.append(Check(family, "load", False, f"{type(e).__name__}: {str(e)[:160]}"))
    print(table(checks))
    failed = [c for c in checks if not c.ok]
    print(f"\n{len(checks) - len(failed)} passed, {len(failed)} failed in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

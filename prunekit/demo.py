"""``python -m prunekit.demo``: prune a tiny LLaVA-1.5 and print what happened.

With no arguments it builds (once, cached) the embedded tiny random-weight model, runs every built-in
strategy at a budget of 16 of its 64 visual tokens on a small batch, and prints each trace next to the
fidelity to the unpruned model. ``--model`` takes a local directory or hub id of a real LLaVA-1.5.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import prunekit
from prunekit.compat import LOAD_KWARGS
from prunekit.tiny import synthetic_image, tiny_llava_dir

QUESTIONS = ["Is there a red box in the image?", "How many shapes can you see?"]


def load(path: str, dtype: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype), **LOAD_KWARGS).eval()
    return model, AutoProcessor.from_pretrained(path)


def inputs_for(processor, image_size: int, n: int):
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}],
            add_generation_prompt=True,
        )
        for i in range(n)
    ]
    images = [synthetic_image(i, image_size) for i in range(n)]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def run(model, inputs, max_new_tokens: int):
    start = time.perf_counter()
    logits = model(**inputs).logits[:, -1].float()
    prefill_ms = (time.perf_counter() - start) * 1e3
    tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return logits, tokens[:, inputs["input_ids"].shape[1]:], prefill_ms


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="LLaVA-1.5 directory or hub id (default: the embedded tiny model)")
    ap.add_argument("--strategies", nargs="*", default=None, help=f"default: all of {prunekit.list_strategies()}")
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = args.model or str(tiny_llava_dir())
    model, processor = load(path, args.dtype)
    image_size = model.config.vision_config.image_size
    inputs = inputs_for(processor, image_size, args.batch).to(model.device)
    tiny = args.model is None
    print(f"prunekit {prunekit.__version__} | model: {path} ({type(model).__name__}, {args.dtype}) | "
          f"torch {torch.__version__} | batch {args.batch}")
    if tiny:
        print("NOTE: the embedded model has random weights; its answers mean nothing. Fidelity to the unpruned\n"
              "      model (same next token, KL of next-token distributions) is what this demo reports.")

    with torch.no_grad():
        ref_logits, ref_tokens, ref_ms = run(model, inputs, args.max_new_tokens)
        print(f"\nvanilla: prefill {ref_ms:.1f} ms, tokens {ref_tokens.tolist()}")
        for name in args.strategies or prunekit.list_strategies():
            params = {} if name == "keep_all" else {"budget": args.budget}
            with prunekit.attach(model, name, **params) as handle:
                logits, tokens, ms = run(model, inputs, args.max_new_tokens)
            kl = F.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True,
                          reduction="none").sum(-1)
            agree = (tokens == ref_tokens).float().mean().item() if tokens.shape == ref_tokens.shape else float("nan")
            print(f"\n{handle.strategy!r}")
            print(handle.trace)
            print(f"  fidelity: next-token agreement {(logits.argmax(-1) == ref_logits.argmax(-1)).float().mean():.2f}, "
                  f"KL(vanilla || pruned) {kl.mean():.4f}, generated-token agreement {agree:.2f}, "
                  f"prefill {ms:.1f} ms")
            print(f"  kept positions (sample 0): {handle.trace.kept_positions(0).tolist()}")


if __name__ == "__main__":
    main()

"""Shared test helpers: prompts, batches and reference computations done without prunekit."""
from __future__ import annotations

import torch

from prunekit.tiny import synthetic_image

QUESTIONS = [
    "is there a red box?",
    "how many shapes are there in this picture?",
    "what colour is the background?",
    "is it big?",
]


def prompt(processor, question: str, image: bool = True) -> str:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def batch(processor, indices, image: bool = True):
    """Left-padded batch of the given sample indices (different prompts and images)."""
    texts = [prompt(processor, QUESTIONS[i % len(QUESTIONS)], image) for i in indices]
    if not image:
        return processor.tokenizer(texts, return_tensors="pt", padding=True)
    images = [synthetic_image(100 + i) for i in indices]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def greedy(model, inputs, steps=4):
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                         output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    return new, torch.stack(out.logits, 1)


def generate_positions(mask: torch.Tensor) -> torch.Tensor:
    """The position ids transformers' generate derives from a left-padded mask."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def vision_features(model, pixel_values):
    """Vision features at LLaVA's feature layer, CLS dropped: what reaches the projector."""
    hs = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return hs[model.config.vision_feature_layer][:, 1:]

"""Shared test helpers: prompts, batches and reference computations done without prunekit."""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from prunekit import Keep, Stage, TokenPruner
from prunekit.signals import AttentionRows, Signals
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


def recompute_last_logits(model, x, generated):
    """Last-position logits of a no-cache forward over the prompt plus ``generated`` tokens."""
    ids = torch.cat([x["input_ids"], generated], 1)
    mask = torch.cat([x["attention_mask"], torch.ones_like(generated)], 1)
    return model(input_ids=ids, attention_mask=mask, pixel_values=x["pixel_values"],
                 position_ids=generate_positions(mask), use_cache=False).logits[:, -1]


def vision_features(model, pixel_values):
    """Vision features at LLaVA's feature layer, CLS dropped: what reaches the projector."""
    hs = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return hs[model.config.vision_feature_layer][:, 1:]


def tower_reference(model, pixel_values, cuts):
    """Vision features with patch tokens reduced after given encoder layers, computed by hand.

    ``cuts`` maps a layer index to a function (patches (B, n, D)) -> patches; CLS always passes.
    """
    tower = model.model.vision_tower
    feature = model.config.vision_feature_layer % (len(tower.encoder.layers) + 1) - 1
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    for i, layer in enumerate(tower.encoder.layers[: feature + 1]):
        hidden = layer(hidden, None)
        if i in cuts:
            hidden = torch.cat([hidden[:, :1], cuts[i](hidden[:, 1:])], 1)
    return hidden[:, 1:]


ROWS = (AttentionRows("first", "all"), AttentionRows("mean", "mean"))
LLM_ROWS = (AttentionRows("last", "all"), AttentionRows("text", "mean"))


class Recorder(TokenPruner):
    """Keeps everything (or a ragged random subset at ``cut``) and records what its contexts show."""

    name = "recorder"

    def __init__(self, sites, cut=None):
        super().__init__()
        self._sites, self.cut, self.seen = list(sites), cut, {}

    def sites(self):
        return self._sites + ([self.cut] if self.cut else [])

    def signals(self, site):
        if site == self.cut:
            return None
        rows = LLM_ROWS if site.stage is Stage.LLM_LAYER else ROWS
        return Signals(rows=rows, keys=True, values=True)

    def prune(self, ctx):
        if ctx.site == self.cut:  # 5..16 tokens per image, drawn from the image's seed
            keep = []
            for u in range(ctx.num_units):
                g = ctx.generator(u)
                keep.append(torch.randperm(int(ctx.lengths[u]), generator=g)[: int(torch.randint(5, 17, (1,), generator=g))].sort().values)
            return Keep(keep)
        rows = LLM_ROWS if ctx.stage is Stage.LLM_LAYER else ROWS
        self.seen[ctx.site] = dict(
            rows={r: ctx.attention(r.query, r.heads) for r in rows}, keys=ctx.keys(), values=ctx.values(),
            lengths=ctx.lengths.clone(), types=ctx.token_types, text=ctx.text_queries() if ctx.stage is Stage.LLM_LAYER else None,
            cls_value=None if ctx.stage is Stage.LLM_LAYER else ctx.query_values("first"),
        )
        return Keep([torch.arange(int(n)) for n in ctx.lengths])


def ragged_keep(ctx) -> Keep:
    """A different random count (5..16) of tokens per unit, seeded per unit: ragged cuts for batch tests."""
    keep = []
    for u in range(ctx.num_units):
        g = ctx.generator(u)
        k = int(torch.randint(5, 17, (1,), generator=g))
        keep.append(torch.randperm(int(ctx.lengths[u]), generator=g)[:k].sort().values)
    return Keep(keep)


# --- tiny parquet files in the lmms-eval layouts ----------------------------------------------------
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(size, mode="RGB", colour=0) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def image_column(cells) -> pa.Array:
    """HF `Image` feature as stored in parquet: a {bytes, path} struct per row (None = null cell)."""
    return pa.array([c if c is None or isinstance(c, dict) else {"bytes": c, "path": None} for c in cells],
                    type=IMAGE_TYPE)


def write(path, columns: dict, row_group_size=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = {k: image_column(v) if k == "image" else v for k, v in columns.items()}
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)  # small groups: cross-group reads
    return path


def use_adapter(monkeypatch, cls):
    """Make attach() use adapter class ``cls`` (a deliberately broken seam) for the rest of the test."""
    import importlib

    monkeypatch.setattr(importlib.import_module("prunekit.runtime.handle"), "adapter_for", lambda model: cls(model))


def no_cache_adapter():
    """A LLaVA adapter that stops finding the cache kwarg (what 5.24's rename did to the old code): every decode
    step looks like a prefill."""
    from prunekit.adapters.llava import LlavaAdapter

    class NoCache(LlavaAdapter):
        def read_lm_call(self, kwargs):
            call = super().read_lm_call(kwargs)
            call.cache = None
            return call

    return NoCache

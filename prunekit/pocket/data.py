"""The pocket evaluation split: generated once, checked byte for byte, cached as lmms-eval-layout parquet.

``data/test-00000-of-00001.parquet`` under the dataset folder, with MME's columns (question_id, question,
answer, image as an HF Image struct, category = the question type) plus image_id and negatives (POPE's
random / popular / adversarial, for existence questions). ``prunekit.eval.data`` reads it as ``pocket``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from ..cache import build_once, cache_root
from . import scenes as S

VERSION = "v1"  # bump with the recipe (and EVAL_PIXELS_SHA256), so cached copies are rebuilt
EVAL_SEED = 20251  # the training split draws from other seeds (configs/train_pocket.yaml)
EVAL_IMAGES, QUESTIONS_PER_IMAGE = 400, 3  # 1,200 questions
FILE = "data/test-00000-of-00001.parquet"
# sha256 over the raw RGB bytes of the 400 evaluation pictures, in order (docs/pocket.md): the pictures are the
# same on every machine and every numpy / Pillow release, or the split refuses to build.
EVAL_PIXELS_SHA256 = "2841a5447afaf88a059711909270261566fe8373ad586b9f5c4a5f1fd97225c2"
TEXT_COLUMNS = ("question_id", "question", "answer", "category", "negatives", "image_id")
_ROTATION = ("existence", "attribute", "counting", "spatial", "existence")  # 40 % existence, 20 % each other


def eval_questions(seed: int = EVAL_SEED, n_images: int = EVAL_IMAGES, per_image: int = QUESTIONS_PER_IMAGE):
    """Yields (scene index, scene, [(type, negatives, question, answer), ...]): the types rotate over the whole
    split, so any prefix of rows holds every type; a scene that cannot pose its type asks an existence question."""
    slot = 0
    for i in range(n_images):
        rng = np.random.default_rng([seed, i])
        scene = S.draw_scene(rng)
        asked, seen = [], set()
        while len(asked) < per_image:
            kind = _ROTATION[slot % len(_ROTATION)]
            negatives = S.NEGATIVES[(slot // len(_ROTATION)) % 3] if kind == "existence" else ""
            slot += 1
            qa = S.ask(rng, scene, kind, negatives or "random")
            if qa is None or qa[0] in seen:
                kind, negatives = "existence", S.NEGATIVES[slot % 3]
                qa = S.ask(rng, scene, kind, negatives)
                if qa[0] in seen:
                    continue
            seen.add(qa[0])
            asked.append((kind, negatives, *qa))
        yield i, scene, asked


def write_eval_split(root: str | os.PathLike, seed: int = EVAL_SEED, n_images: int = EVAL_IMAGES,
                     expected_sha256: str | None = None) -> str:
    """Write the split to ``<root>/data/``; returns the pixels' sha256 (checked against ``expected_sha256``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    digest, rows = hashlib.sha256(), []
    for i, scene, asked in eval_questions(seed, n_images):
        digest.update(scene.pixels.tobytes())
        buf = io.BytesIO()
        Image.fromarray(scene.pixels).save(buf, format="PNG")  # lossless: decoding gives these bytes back
        for kind, negatives, question, answer in asked:
            rows.append({"question_id": f"pocket_{len(rows):05d}", "question": question, "answer": answer,
                         "category": kind, "negatives": negatives, "image_id": f"scene_{i:05d}",
                         "image": {"bytes": buf.getvalue(), "path": None}})
    sha = digest.hexdigest()
    if expected_sha256 is not None and sha != expected_sha256:
        raise RuntimeError(f"the pocket pictures drawn here (sha256 {sha[:12]}...) differ from the released ones "
                           f"({expected_sha256[:12]}...): numpy {np.__version__} draws other random numbers. Results "
                           "on this split would not compare with published pocket numbers; report it (docs/pocket.md)")
    schema = pa.schema([(c, pa.string()) for c in TEXT_COLUMNS]
                       + [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))],
                       metadata={"huggingface": json.dumps({"info": {"features": {
                           **{c: {"dtype": "string", "_type": "Value"} for c in TEXT_COLUMNS}, "image": {"_type": "Image"}}}})})
    out = Path(root) / FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out, row_group_size=60)
    return sha


def pocket_data_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The pocket evaluation split, built once under $PRUNEKIT_CACHE (or ~/.cache/prunekit)."""
    return build_once(cache_root(cache_dir) / f"pocket-vqa-{VERSION}", lambda p: (p / FILE).exists(),
                      lambda tmp: write_eval_split(tmp, expected_sha256=EVAL_PIXELS_SHA256), FILE)

"""Benchmark data from local parquet files in the lmms-eval (HF ``datasets``) layouts; no network.

Layouts read (docs/evaluation.md), relative to the dataset folder:

* POPE (``lmms-lab/POPE``, now ``lmms-lab-encoder/POPE``): ``data/test-*.parquet``, or config Full:
  ``Full/{adversarial,popular,random}/*.parquet``. Columns id, question_id, question, answer,
  image_source, image, category.
* MME (``lmms-lab/MME``): ``data/test-*.parquet``. Columns question_id (shared by an image's two
  questions), image, question, answer, category.
* GQA (``lmms-lab/GQA``): ``testdev_balanced_instructions/testdev-*.parquet`` (id, imageId, question,
  answer, ...) joined on ``imageId == id`` with ``testdev_balanced_images/testdev-*.parquet`` (id, image).
* pocket (prunekit's generated VQA split, ``prunekit.pocket.data``): ``data/test-*.parquet``. MME's columns
  (category = the question type) plus image_id and negatives.
* TextVQA (``lmms-lab/textvqa``): ``data/validation-*.parquet``. Columns image_id, question_id,
  question, answers (10 strings), image, ocr_tokens, ...
* MUIRBench (``MUIRBENCH/MUIRBENCH``, several images per question): ``data/test-*.parquet``. Columns idx, task,
  image_relation, image_type, question (with an ``<image>`` mark where each image belongs), options, answer (a
  letter), image_list (a list of images).
* Video-MME (``lmms-lab/Video-MME``, a video per question): ``videomme/test-*.parquet`` (or ``data/test-*.parquet``).
  Columns video_id, duration, domain, sub_category, url, videoID, question_id, task_type, question, options (lettered
  ``"A. ..."``), answer (a letter). The videos are not in the parquet: ``data/<videoID>.mp4`` (else ``.MP4``, else
  ``.mkv``) in the dataset folder, where lmms-eval looks for them (``video.py`` samples and decodes them).

Images are HF ``Image`` structs ``{bytes, path}``; they are decoded with PIL and ``.convert("RGB")``
(as lmms-eval's ``doc_to_visual`` does) only in ``__getitem__``. Text columns are read eagerly; image
bytes are read one parquet row group at a time, so a dataset never holds a whole image file in memory.
A video is found and decoded in ``__getitem__`` too, ``frames`` frames sampled uniformly. A sample whose image
(or video) is missing or cannot be decoded comes back with ``image=None`` (``video=None``) and ``error`` set, for the
caller to skip and count.
"""
from __future__ import annotations

import bisect
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw

from ..cache import build_once, cache_root
from .video import DEFAULT_FRAMES, Video, find_video, read_video, require_av

BENCHMARKS: tuple[str, ...] = ("pope", "mme", "gqa", "textvqa", "pocket", "muirbench", "videomme")
POPE_SPLITS = ("adversarial", "popular", "random")
ORGS = ("lmms-lab", "lmms-lab-encoder", "MUIRBENCH")
HUB_NAMES = {"pope": "POPE", "mme": "MME", "gqa": "GQA", "textvqa": "textvqa", "pocket": "pocket",
             "muirbench": "MUIRBENCH", "videomme": "Video-MME"}
IMAGE_COLUMNS = {"muirbench": "image_list"}  # a list of images per row; elsewhere one ``image``
VIDEO_BENCHMARKS = ("videomme",)  # a video file per row (found by its id), no image column

# Per benchmark: Sample field -> column (required), extra key -> column (read when present).
_REQUIRED = {
    "pope": {"question_id": "question_id", "question": "question", "answer": "answer"},
    "mme": {"question_id": "question_id", "question": "question", "answer": "answer", "category": "category"},
    "gqa": {"question_id": "id", "question": "question", "answer": "answer", "image_id": "imageId"},
    "textvqa": {"question_id": "question_id", "question": "question", "answer": "answers"},
    "pocket": {"question_id": "question_id", "question": "question", "answer": "answer", "category": "category"},
    "muirbench": {"question_id": "idx", "question": "question", "answer": "answer", "category": "task",
                  "options": "options"},
    "videomme": {"question_id": "question_id", "question": "question", "answer": "answer", "category": "task_type",
                 "options": "options", "videoID": "videoID", "duration": "duration", "domain": "domain",
                 "sub_category": "sub_category"},
}
_OPTIONAL = {
    "pope": {"category": "category", "id": "id", "image_source": "image_source"},
    "mme": {},
    "gqa": {"full_answer": "fullAnswer"},
    "textvqa": {"image_id": "image_id", "ocr_tokens": "ocr_tokens"},
    "pocket": {"image_id": "image_id", "negatives": "negatives"},
    "muirbench": {"image_relation": "image_relation", "image_type": "image_type"},
    "videomme": {"video_id": "video_id", "url": "url"},
}
_SAMPLE_FIELDS = ("question_id", "question", "answer", "category")


@dataclass
class Sample:
    uid: str  # str(global row index in sorted file order): unique even where question_id is not (MME)
    question_id: str
    question: str
    answer: str | list[str]
    image: Image.Image | None  # the first image where a benchmark has several
    category: str | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)
    images: list[Image.Image] | None = None  # every image, in order, where a benchmark has several per question
    video: Video | None = None  # a video benchmark's sampled frames (then ``image`` and ``images`` are None)

    def visuals(self) -> list[Image.Image]:
        """The images the prompt shows, in order (none for a video sample: its frames are in ``video``)."""
        if self.images is not None:
            return self.images
        return [] if self.image is None and self.video is not None else [self.image]

    @property
    def usable(self) -> bool:
        """Whether the sample has what its prompt shows (an image or a video), so it can be answered."""
        return self.image is not None or self.video is not None


def collate_samples(batch: list[Sample]) -> list[Sample]:
    """Identity collate: samples stay samples (PIL images do not stack)."""
    return list(batch)


def _patterns(name: str, split: str | None) -> list[str]:
    """Glob patterns inside the dataset folder: text files first; for GQA then the image files."""
    if name == "pope":
        if split in (None, "test"):
            return ["data/test-*.parquet"]
        if split in POPE_SPLITS:
            return [f"Full/{split}/*.parquet"]
        raise ValueError(f"pope split must be None/'test' or one of {POPE_SPLITS}, got {split!r}")
    if name in ("mme", "pocket", "muirbench"):
        return [f"data/{split or 'test'}-*.parquet"]
    if name == "videomme":  # the hub's config folder; a plain data/ folder is read too (_find_files)
        return [f"videomme/{split or 'test'}-*.parquet"]
    if name == "textvqa":
        return [f"data/{split or 'validation'}-*.parquet"]
    config = split or "testdev_balanced"
    prefix = config.split("_")[0]
    return [f"{config}_instructions/{prefix}-*.parquet", f"{config}_images/{prefix}-*.parquet"]


def _ci_child(parent: Path, name: str) -> Path | None:
    """The sub-folder of ``parent`` called ``name``, ignoring case (hub names are POPE, but textvqa)."""
    exact = parent / name
    if exact.is_dir():
        return exact
    matches = sorted(p for p in parent.iterdir() if p.is_dir() and p.name.lower() == name.lower())
    return matches[0] if matches else None


def _candidates(root: Path, hub: str):
    """Folders that may hold the dataset: root itself, <root>/<org>/<hub>, <root>/<hub>, a hub cache."""
    yield root
    for org in ORGS:
        org_dir = _ci_child(root, org)
        if org_dir is not None and (d := _ci_child(org_dir, hub)) is not None:
            yield d
    if (d := _ci_child(root, hub)) is not None:
        yield d
    for org in ORGS:  # huggingface_hub cache: <root>/datasets--<org>--<hub>/snapshots/<rev>/
        yield from sorted(root.glob(f"datasets--{org}--{hub}/snapshots/*"))


def _layout_hint(name: str, root: Path, patterns: list[str]) -> str:
    hub = HUB_NAMES[name]
    files = " and ".join(f"{root}/{p}" for p in patterns)
    if name == "pocket":  # generated, not downloaded
        return f"expected {files}; the pocket split is generated: leave data.root unset (data=pocket) to build it"
    if name == "muirbench":  # not under lmms-lab
        return (f"expected {files} (MUIRBENCH/{hub} layout), or a parent folder holding MUIRBENCH/{hub} or {hub}; "
                f"fetch it with `hf download MUIRBENCH/{hub} --repo-type dataset --local-dir {root}/MUIRBENCH/{hub}`")
    if name == "videomme":
        return (f"expected {files} or {root}/data/test-*.parquet (lmms-lab/{hub} layout), with the videos as "
                f"{root}/data/<videoID>.mp4, or a parent folder holding lmms-lab/{hub} or {hub}; fetch it with "
                f"`hf download lmms-lab/{hub} --repo-type dataset --local-dir {root}/lmms-lab/{hub}` and unzip its "
                f"videos_chunked_*.zip there (they unpack to data/)")
    return (f"expected {files} (lmms-lab/{hub} layout), or a parent folder holding lmms-lab/{hub}, "
            f"lmms-lab-encoder/{hub} or {hub}; fetch it with e.g. `hf download lmms-lab/{hub} "
            f"--repo-type dataset --local-dir {root}/lmms-lab/{hub}`")


def _find_files(name: str, root: Path, split: str | None) -> tuple[Path, list[list[Path]]]:
    patterns = _patterns(name, split)
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: data root {root} does not exist; {_layout_hint(name, root, patterns)}")
    for d in _candidates(root, HUB_NAMES[name]):
        first = sorted(d.glob(patterns[0]))
        if not first and name == "videomme":  # the parquet beside the videos, in data/
            first = sorted(d.glob(f"data/{split or 'test'}-*.parquet"))
        if first:
            found = [first] + [sorted(d.glob(p)) for p in patterns[1:]]
            for p, files in zip(patterns, found):
                if not files:  # GQA instructions without their images config
                    raise FileNotFoundError(f"{name}: found {d}/{patterns[0]} but no {d}/{p}; "
                                            f"{_layout_hint(name, d, patterns)}")
            return d, found
    raise FileNotFoundError(f"{name}: no parquet files under {root}; {_layout_hint(name, root, patterns)}")


def _parquet(path: Path, read, *args, **kwargs):
    """``read(path, ...)`` with an unreadable file named in the error (pyarrow's own message does not name it)."""
    try:
        return read(path, *args, **kwargs)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e}). Re-download or remove "
                         "it; the other files of the benchmark are fine to keep") from e


def _check_columns(path: Path, names: list[str], what: str) -> list[str]:
    found = _parquet(path, pq.read_schema).names
    missing = [c for c in names if c not in found]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing} for {what}; found {found}. "
                         f"Is this the right benchmark / config folder?")
    return found


def _text(v):
    return None if v is None else str(v)


class BenchmarkData(torch.utils.data.Dataset):
    """Rows of one benchmark; ``__getitem__`` returns a :class:`Sample` with the image (or video) decoded then.

    Picklable for DataLoader workers: parquet handles are opened lazily in each process. ``frames``: how many frames
    a video benchmark samples per video.
    """

    def __init__(self, name: str, root: Path, rows: list[dict], image_files: list[Path],
                 image_loc: list[tuple[int, int] | None], frames: int = DEFAULT_FRAMES):
        self.name = name
        self.root = root
        self.frames = frames
        self._rows = rows  # text fields per row
        self._image_files = [str(p) for p in image_files]
        self._image_loc = image_loc  # per row: (index into _image_files, row in that file), None = no image
        self._reset_handles()

    def _reset_handles(self):
        self._pid = os.getpid()
        self._handles: dict[int, tuple[pq.ParquetFile, list[int]]] = {}
        self._cache: tuple[int, int, pa.ChunkedArray] | None = None  # (file, row group, image column)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_handles={}, _cache=None, _pid=None)
        return state

    def __len__(self):
        return len(self._rows)

    def __repr__(self):
        return f"BenchmarkData({self.name!r}, {len(self)} rows, root={str(self.root)!r})"

    def _image_cell(self, file_idx: int, row: int):
        if self._pid != os.getpid():  # forked after opening: file handles must not be shared
            self._reset_handles()
        if file_idx not in self._handles:
            pf = pq.ParquetFile(self._image_files[file_idx])
            starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows
                                      for i in range(pf.num_row_groups)]).tolist()
            self._handles[file_idx] = (pf, starts)
        pf, starts = self._handles[file_idx]
        rg = bisect.bisect_right(starts, row) - 1
        if self._cache is None or self._cache[:2] != (file_idx, rg):
            column = IMAGE_COLUMNS.get(self.name, "image")
            self._cache = (file_idx, rg, pf.read_row_group(rg, columns=[column]).column(0))
        return self._cache[2][row - starts[rg]].as_py()

    def __getitem__(self, i: int) -> Sample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.name}: index {i} out of range for {len(self)} rows")
        i %= len(self)
        r = self._rows[i]
        if self.name in VIDEO_BENCHMARKS:
            return self._video_sample(i, r)
        loc = self._image_loc[i]
        images = None
        if loc is None:
            image, error = None, f"missing image: image id {r['extra'].get('image_id')!r} not in the images files"
        elif self.name in IMAGE_COLUMNS:  # several images: the sample is unusable if any one is
            decoded = [_decode(c) for c in self._image_cell(*loc) or []]
            error = next((f"image {k}: {e}" for k, (_, e) in enumerate(decoded) if e), None if decoded else "no images")
            images = None if error else [im for im, _ in decoded]
            image = images[0] if images else None
        else:
            image, error = _decode(self._image_cell(*loc))
        return Sample(uid=str(i), image=image, error=error, extra=dict(r["extra"]), images=images,
                      **{k: r[k] for k in _SAMPLE_FIELDS})

    def _video_sample(self, i: int, r: dict) -> Sample:
        video_id = r["extra"].get("videoID")
        path = find_video(self.root, str(video_id))
        if path is None:
            video, error = None, f"missing video: no {self.root}/data/{video_id}.mp4 (nor .MP4, .mkv)"
        else:
            video, error = read_video(path, self.frames)
        return Sample(uid=str(i), image=None, error=error, extra=dict(r["extra"]), video=video,
                      **{k: r[k] for k in _SAMPLE_FIELDS})


def _decode(cell) -> tuple[Image.Image | None, str | None]:
    """HF Image struct (or raw bytes) -> (RGB image, None) or (None, why it is unusable)."""
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
    else:
        data, path = cell, None
    if not data:
        if path and os.path.isfile(path):  # HF may store only a local path
            data = Path(path).read_bytes()
        else:
            return None, f"missing image: empty image cell (path={path!r})"
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB"), None
    except Exception as e:  # any undecodable payload is a per-sample failure, not a crash
        return None, f"cannot decode image: {type(e).__name__}: {e}"


def _read_rows(name: str, files: list[Path], limit: int | None, need_image: bool) -> tuple[list[dict], list]:
    """Text fields of the first ``limit`` rows, plus each row's (file index, row) for its image."""
    required, optional = _REQUIRED[name], _OPTIONAL[name]
    rows, locs = [], []
    for fi, path in enumerate(files):
        if limit is not None and len(rows) >= limit:
            break
        image_column = IMAGE_COLUMNS.get(name, "image")
        found = _check_columns(path, list(required.values()) + ([image_column] if need_image else []), name)
        present = {k: c for k, c in optional.items() if c in found}
        cols = list(dict.fromkeys([*required.values(), *present.values()]))
        table = _parquet(path, pq.read_table, columns=cols)
        if limit is not None:
            table = table.slice(0, limit - len(rows))
        data = table.to_pydict()
        for j in range(table.num_rows):
            v = {k: data[c][j] for k, c in {**required, **present}.items()}
            answer = v.pop("answer")
            rows.append({
                "question_id": _text(v.pop("question_id")),
                "question": v.pop("question"),
                "answer": [str(a) for a in answer or []] if name == "textvqa" else _text(answer),
                "category": _text(v.pop("category", None)),
                "extra": v,
            })
            locs.append((fi, j))
    return rows, locs


def load_benchmark(name: str, root: str | os.PathLike, split: str | None = None,
                   limit: int | None = None, frames: int | None = None) -> BenchmarkData:
    """Read benchmark ``name`` from local parquet under ``root`` (the dataset folder or a parent of it).

    ``split``: for POPE one of adversarial/popular/random selects config ``Full/<split>/``; default the
    ``data/test-*`` files. ``limit``: keep only the first N rows (sorted file order), for quick runs.
    ``frames``: a video benchmark's frames per video, sampled uniformly (default 8, lmms-eval's); None elsewhere.
    """
    name = name.lower()
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {list(BENCHMARKS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"data.limit must be a positive number of rows (or null for every row), got {limit!r}")
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise ValueError(f"data.frames must be a positive number of frames per video, got {frames!r}")
    if frames is not None and name not in VIDEO_BENCHMARKS:
        raise ValueError(f"data.frames applies to the video benchmarks {list(VIDEO_BENCHMARKS)}, not {name!r}")
    root = Path(root).expanduser()
    dataset_dir, found = _find_files(name, root, split)
    if name in VIDEO_BENCHMARKS:  # the videos are files beside the parquet, found and decoded per row
        require_av()  # fail here, before a model loads, not on every row
        rows, _ = _read_rows(name, found[0], limit, need_image=False)
        return BenchmarkData(name, dataset_dir, rows, [], [None] * len(rows), frames=frames or DEFAULT_FRAMES)
    if name != "gqa":
        rows, locs = _read_rows(name, found[0], limit, need_image=True)
        return BenchmarkData(name, dataset_dir, rows, found[0], locs)

    # GQA: questions and images live in separate configs; index image ids only, decode on access.
    rows, _ = _read_rows(name, found[0], limit, need_image=False)
    index: dict[str, tuple[int, int]] = {}
    for fi, path in enumerate(found[1]):
        _check_columns(path, ["id", "image"], "gqa images")
        for j, image_id in enumerate(_parquet(path, pq.read_table, columns=["id"]).column(0).to_pylist()):
            index.setdefault(str(image_id), (fi, j))
    locs = [index.get(str(r["extra"]["image_id"])) for r in rows]
    return BenchmarkData(name, dataset_dir, rows, found[1], locs)


# ---- synthetic POPE: the runner's embedded default, true answers on generated pictures ----

SYNTHETIC_VERSION = "v1"  # bump when the recipe changes, so cached copies are rebuilt
SYNTHETIC_FILE = "data/test-00000-of-00001.parquet"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 60, 230), "yellow": (230, 220, 30)}
SHAPES = ("square", "circle")

_POPE_SCHEMA = pa.schema(
    [("id", pa.string()), ("question_id", pa.string()), ("question", pa.string()), ("answer", pa.string()),
     ("image_source", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
     ("category", pa.string())],
    # the feature metadata HF `datasets` writes, so it too would read `image` as an Image column
    metadata={"huggingface": json.dumps({"info": {"features": {
        **{c: {"dtype": "string", "_type": "Value"} for c in
           ("id", "question_id", "question", "answer", "image_source", "category")},
        "image": {"_type": "Image"}}}})},
)


def _draw_objects(rng: np.random.Generator, size: int, objects: list[tuple[str, str]]) -> Image.Image:
    """Dark noisy background; each object fills part of its own quadrant, so none overlap."""
    img = Image.fromarray(rng.integers(0, 60, (size, size, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    half = size // 2
    for (colour, shape), q in zip(objects, rng.permutation(4)):
        side = int(rng.integers(half * 5 // 10, half * 8 // 10))
        x0 = (q % 2) * half + int(rng.integers(0, half - side))
        y0 = (q // 2) * half + int(rng.integers(0, half - side))
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    return img


def write_synthetic_pope(root: str | os.PathLike, n_images: int = 16, image_size: int = 112, seed: int = 0) -> Path:
    """Write a small benchmark in the exact POPE schema to ``<root>/data/``; returns ``root``.

    Each picture holds 1-3 coloured squares/circles; it gets one question about an object that is drawn
    (answer "yes") and one about an absent object ("no"), so the answers are true for the picture.
    "adversarial" images ask about an absent object sharing a colour or shape with a drawn one.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    records = []
    for i in range(n_images):
        drawn = [kinds[k] for k in rng.choice(len(kinds), size=int(rng.integers(1, 4)), replace=False)]
        img = _draw_objects(rng, image_size, drawn)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        category = POPE_SPLITS[i % 3]
        absent = [k for k in kinds if k not in drawn]
        if category == "adversarial":  # hard negatives: share a colour or a shape with a drawn object
            absent = [k for k in absent if any(k[0] == d[0] or k[1] == d[1] for d in drawn)] or absent
        qs = [(drawn[int(rng.integers(len(drawn)))], "yes"), (absent[int(rng.integers(len(absent)))], "no")]
        for (colour, shape), answer in [qs[k] for k in rng.permutation(2)]:
            qid = str(len(records))
            records.append({"id": qid, "question_id": qid, "question": f"Is there a {colour} {shape} in the image?",
                            "answer": answer, "image_source": f"synthetic_{i:05d}",
                            "image": {"bytes": buf.getvalue(), "path": None}, "category": category})
    out = root / SYNTHETIC_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records, schema=_POPE_SCHEMA), out, row_group_size=100)
    return root


def synthetic_pope_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The synthetic POPE dataset folder, built once under $PRUNEKIT_CACHE (or ~/.cache/prunekit)."""
    return build_once(cache_root(cache_dir) / f"synthetic-pope-{SYNTHETIC_VERSION}",
                      lambda p: (p / SYNTHETIC_FILE).exists(), write_synthetic_pope, SYNTHETIC_FILE)

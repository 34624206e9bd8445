"""Kept-token overlays: the original picture with the patches a strategy kept, per strategy and per cut.

Each record holds the surviving span positions (``kept``, and ``kept_after`` each pruning event: hex bitmasks,
``prunekit.eval.records.decode_positions``). A position is mapped to its patch on the original picture through
the processor's own geometry:

* LLaVA-1.5 (CLIP): optional pad to square, resize (shortest edge, or height x width), center crop, then the
  (crop / patch) grid in raster order. What the crop cut away is drawn hatched grey.
* Qwen2-VL / Qwen2.5-VL: resize to the processor's ``image_grid_thw`` (no crop); a token is a 2x2 merge group.
* LLaVA-NeXT (anyres: a base image plus crops, unpadded, with newline tokens) is not mapped: skipped with a note.

Kept patches keep their colours, dropped ones are darkened; merged tokens show their representative only.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from ..eval.records import decode_positions
from .table import Study

CLIP_FAMILIES = ("llava",)
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
DISPLAY = 224  # longer side of each drawn picture, px (more for fine grids: 14 px per patch, up to 448)
OUTLINE_MIN = 12  # px: patches smaller than this on screen get no outline (it would hide the picture)
KEPT_EDGE = (255, 0, 255)  # magenta: unlike any colour of the synthetic shapes, visible on photos


class Unsupported(Exception):
    """The model family's token layout is not mapped to pixels."""


def _size(size, key):
    return getattr(size, key, None) if not isinstance(size, dict) else size.get(key)


def patch_boxes(processor, model_type: str, image: Image.Image) -> np.ndarray:
    """(n, 4) boxes [x0, y0, x1, y1] in the original picture's pixels of the image's visual tokens, in span order."""
    if model_type in CLIP_FAMILIES:
        return _clip_boxes(processor, image)
    if model_type in QWEN_FAMILIES:
        return _qwen_boxes(processor.image_processor, image)
    raise Unsupported(f"overlays map LLaVA-1.5 and Qwen2-VL / Qwen2.5-VL token grids; {model_type!r} is not mapped "
                      "(LLaVA-NeXT: a base image plus anyres crops, unpadded, with newline tokens)")


def _clip_boxes(processor, image: Image.Image) -> np.ndarray:
    ip = processor.image_processor
    patch = processor.patch_size
    w, h = image.size
    off_x = off_y = 0.0
    if getattr(ip, "do_pad", False):  # LLaVA's pad-to-square, centred
        side = max(w, h)
        off_x, off_y, w, h = (side - w) / 2, (side - h) / 2, side, side
    w2, h2 = w, h
    if getattr(ip, "do_resize", True):
        short = _size(ip.size, "shortest_edge")
        if short:  # transformers' get_resize_output_image_size(default_to_square=False)
            long = int(short * max(w, h) / min(w, h))
            w2, h2 = (short, long) if w <= h else (long, short)
        else:
            w2, h2 = _size(ip.size, "width"), _size(ip.size, "height")
    top = left = 0
    cw, ch = w2, h2
    if getattr(ip, "do_center_crop", False):
        cw, ch = _size(ip.crop_size, "width"), _size(ip.crop_size, "height")
        top, left = (h2 - ch) // 2, (w2 - cw) // 2
    rows, cols = ch // patch, cw // patch
    r, c = np.divmod(np.arange(rows * cols), cols)
    sx, sy = w2 / w, h2 / h
    x0 = (left + c * patch) / sx - off_x
    y0 = (top + r * patch) / sy - off_y
    return np.stack([x0, y0, x0 + patch / sx, y0 + patch / sy], 1)


def _qwen_boxes(ip, image: Image.Image) -> np.ndarray:
    _, gh, gw = (int(x) for x in ip(images=[image], return_tensors="np")["image_grid_thw"][0])
    merge, patch = ip.merge_size, ip.patch_size
    rows, cols = gh // merge, gw // merge
    w, h = image.size
    sx, sy = gw * patch / w, gh * patch / h  # resized / original
    r, c = np.divmod(np.arange(rows * cols), cols)
    cell = merge * patch
    x0, y0 = c * cell / sx, r * cell / sy
    return np.stack([x0, y0, x0 + cell / sx, y0 + cell / sy], 1)


def _shown(image: Image.Image, cells: int = 0) -> tuple[Image.Image, float]:
    scale = min(max(DISPLAY, 14 * cells), 2 * DISPLAY) / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR  # NEAREST: crisp patch edges
    return image.convert("RGB").resize(size, resample), scale


def render(image: Image.Image, boxes: np.ndarray | None = None, kept: set[int] | None = None,
           cells: int = 0) -> np.ndarray:
    """The picture with kept patches in colour, dropped ones darkened, cropped-away parts hatched grey;
    without ``boxes``, the picture alone (``cells``: its grid resolution, for the same size as its overlays)."""
    shown, scale = _shown(image, cells or _cells_across(boxes))
    if boxes is None:
        return np.asarray(shown)
    arr = np.asarray(shown).astype(np.float32)
    hh, ww = arr.shape[:2]
    ys, xs = np.mgrid[0:hh, 0:ww]
    out = 0.5 * arr.mean(2, keepdims=True).repeat(3, 2) * ((xs + ys) % 8 < 4)[..., None] + 40  # not seen by the model
    px = np.rint(boxes * scale).astype(int)
    for i, (x0, y0, x1, y1) in enumerate(px):
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, ww), min(y1, hh)
        out[y0:y1, x0:x1] = arr[y0:y1, x0:x1] * (1.0 if i in kept else 0.22)
    picture = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for i in kept:
        if i < len(px) and px[i, 2] - px[i, 0] >= OUTLINE_MIN:
            draw.rectangle([int(v) for v in (px[i, 0], px[i, 1], px[i, 2] - 1, px[i, 3] - 1)], outline=KEPT_EDGE)
    return np.asarray(picture)


def _cells_across(boxes: np.ndarray | None) -> int:
    """Patches along the picture's longer side (the grid's resolution)."""
    if boxes is None or not len(boxes):
        return 0
    width = boxes[0, 2] - boxes[0, 0]
    return int(round(max(boxes[:, 2].max() - boxes[:, 0].min(), boxes[:, 3].max() - boxes[:, 1].min()) / width))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _grid(cells: list[list[tuple[str, np.ndarray] | None]], path: Path, title: str) -> None:
    """Pictures in a grid, each under its label, a title on top (PIL: fast, no layout engine needed)."""
    pad, label_h, title_h = 6, 18, 26
    cols = max(len(r) for r in cells)
    cell_w = max((c[1].shape[1] for r in cells for c in r if c is not None), default=DISPLAY)
    cell_h = max((c[1].shape[0] for r in cells for c in r if c is not None), default=DISPLAY)
    title_w = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=_font(14)))
    width = max(pad + cols * (cell_w + pad), title_w + 2 * pad)
    sheet = Image.new("RGB", (width, title_h + len(cells) * (label_h + cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 5), title, fill="black", font=_font(14))
    small = _font(11)
    for i, row in enumerate(cells):
        y = title_h + i * (label_h + cell_h + pad)
        for j, cell in enumerate(row):
            if cell is None:
                continue
            label, picture = cell
            x = pad + j * (cell_w + pad)
            while len(label) > 4 and draw.textlength(label, font=small) > cell_w:
                label = label[:-2].rstrip() + "…" if not label.endswith("…") else label[:-2] + "…"
            draw.text((x, y + 2), label, fill="black", font=small)
            sheet.paste(Image.fromarray(picture), (x, y + label_h))
    info = PngInfo()  # the cell labels, machine-readable: which run and how many patches each picture shows
    info.add_text("cells", json.dumps([[None if c is None else c[0] for c in row] for row in cells]))
    sheet.save(path, pnginfo=info)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_")


def _loader(config: dict):
    """(processor, model_type, dataset) from a run's config."""
    from transformers import AutoConfig

    from ..eval.datamodule import BenchmarkDataModule
    from ..loading import load_processor, resolve_model_path

    path = resolve_model_path((config.get("model") or {}).get("path"))
    model_type = AutoConfig.from_pretrained(path).model_type
    processor = load_processor(path, model_type)
    data = config.get("data") or {}
    keys = ("benchmark", "root", "split", "limit", "synthetic")
    module = BenchmarkDataModule(**{k: data[k] for k in keys if k in data}, num_workers=0)
    module.setup("test")
    return processor, model_type, module.dataset


def write_overlays(study: Study, out_dir: Path, samples: int = 4,
                   uids: list[str] | None = None) -> tuple[list[Path], list[str]]:
    """Per (model, dataset, budget): a grid of pictures x strategies; per run that cuts more than once: pictures x
    cuts. Returns the files written and notes on what could not be drawn."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written, notes = [], []
    for model in study.models:
        prefix = "" if len(study.models) == 1 else f"{_safe(model)}_"
        for ds in study.datasets:
            have = [r for r in study.rows_of(model) if not r.reference and ds in r.runs and r.runs[ds].scored]
            without = [r for r in have if "kept" not in r.runs[ds].scored[0]]
            notes += [f"{r.runs[ds].describe()}: its records have no kept positions (runs before prunekit recorded "
                      "them); re-run it for overlays" for r in without]
            have = [r for r in have if r not in without]
            if not have:
                continue
            try:
                processor, model_type, dataset = _loader(have[0].runs[ds].config)
            except Exception as e:  # no processor / data on this machine: say so, draw the rest
                notes.append(f"{model} on {ds}: no overlays, cannot load the processor or images "
                             f"({type(e).__name__}: {e})")
                continue
            recs = {id(r): {rec["uid"]: rec for rec in r.runs[ds].scored} for r in have}  # labels repeat over budgets
            common = [u for u in recs[id(have[0])] if all(u in m for m in recs.values())]
            pictures, boxes = _pick(dataset, processor, model_type, common, uids, samples, notes, f"{model} on {ds}")
            if not boxes:
                continue
            blank = False
            for budget in sorted({r.budget for r in have}, key=lambda b: -(b or 0)):
                columns = [(r.label, recs[id(r)], "kept") for r in have if r.budget == budget]
                path = out_dir / f"{prefix}{_safe(ds)}_budget{budget}.png"
                blank |= _sheet(columns, pictures, boxes, path,
                                f"{model} · {ds} · budget {budget}: kept patches (bright) per strategy")
                written.append(path)
            for r in have:
                sites = list(recs[id(r)][next(iter(boxes))].get("kept_after") or {})
                if len(sites) < 2:
                    continue  # one cut: the budget grid shows it
                path = out_dir / f"{prefix}{_safe(ds)}_{_safe(r.label)}_budget{r.budget}_cuts.png"
                blank |= _sheet([(site, recs[id(r)], site) for site in sites], pictures, boxes, path,
                                f"{model} · {ds} · {r.label} @{r.budget}: patches alive after each cut")
                written.append(path)
            if blank:
                notes.append(f"{model} on {ds}: some cells are blank: those samples' visual tokens are not one "
                             "image's grid (several images per sample)")
    return written, notes


def _pick(dataset, processor, model_type: str, common: list[str], uids: list[str] | None, samples: int,
          notes: list[str], where: str) -> tuple[dict, dict]:
    """Pictures and patch boxes of the requested samples, or of the first ones showing different pictures."""
    wanted = len(uids) if uids else samples
    pictures, boxes, seen = {}, {}, set()
    for uid in [u for u in (uids or common) if u in common]:
        if len(boxes) == wanted:
            break
        try:
            sample = dataset[int(uid)]
            if sample.image is None:
                raise ValueError(sample.error or "no image")
            digest = hash(sample.image.tobytes())
            if digest in seen and not uids:
                continue  # POPE and MME ask several questions about one picture: show different pictures
            seen.add(digest)
            boxes[uid] = patch_boxes(processor, model_type, sample.image)
            pictures[uid] = sample.image
        except Unsupported as e:
            notes.append(f"{where}: no overlays ({e})")
            return {}, {}
        except (IndexError, ValueError) as e:
            notes.append(f"{where}, sample {uid}: cannot read its image ({e})")
    return pictures, boxes


def _sheet(columns: list[tuple[str, dict, str]], pictures: dict, boxes: dict, path: Path, title: str) -> bool:
    """One row per picture: the picture, then one overlay per (label, records by uid, "kept" or a site).
    Returns whether a cell had to be left blank."""
    rows = []
    for uid, picture in pictures.items():
        question = next(iter(columns))[1][uid]["question"]
        cells = [(f"uid {uid}: {question}", render(picture, cells=_cells_across(boxes[uid])))]
        cells += [_cell(label, by_uid[uid], which, boxes[uid], picture) for label, by_uid, which in columns]
        rows.append(cells)
    _grid(rows, path, title)
    return any(c is None for row in rows for c in row)


def _cell(label: str, record: dict, which: str, boxes: np.ndarray, picture: Image.Image):
    mask = record.get("kept") if which == "kept" else (record.get("kept_after") or {}).get(which)
    if mask is None or record.get("n_vanilla") != len(boxes):
        return None  # this sample's tokens are not one image's grid (several images, or a layout not mapped)
    kept = set(decode_positions(mask))
    return f"{label}: {len(kept)}/{len(boxes)}", render(picture, boxes, kept)

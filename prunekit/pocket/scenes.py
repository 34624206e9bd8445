"""Pocket scenes: 336 px pictures of small coloured shapes on a cluttered or textured background, and
one-word questions that are true to them (docs/pocket.md, "Data").

Everything is drawn with integer numpy arithmetic at the processor's input size (24 x 24 patches of 14 px,
LLaVA-1.5's 576 visual tokens), so no resize or crop happens and the pixels do not depend on Pillow's drawing
code. Scene ``i`` of a split is drawn from ``numpy.random.default_rng([seed, i])``: any scene can be rebuilt
alone, and the training and evaluation splits differ by their seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE, PATCH = 336, 14
GRID = SIZE // PATCH  # 24 x 24 = 576 patches
COLOURS = {"red": (215, 35, 35), "green": (40, 175, 55), "blue": (40, 80, 225), "yellow": (230, 205, 35),
           "purple": (145, 55, 195), "orange": (240, 135, 25), "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 40, "large": 56}  # bounding-box side in px: 0.7-2.8 % of the picture, 3-4 patches across
KINDS = tuple((c, s) for c in COLOURS for s in SHAPES)
# Kinds are drawn with a fixed Zipf-like preference, so "popular" negatives (POPE) are the frequent kinds.
_KIND_WEIGHTS = 1.0 / np.arange(1, len(KINDS) + 1) ** 0.5
KIND_PRIOR = _KIND_WEIGHTS / _KIND_WEIGHTS.sum()
POPULAR = tuple(KINDS[k] for k in np.argsort(-KIND_PRIOR, kind="stable")[:8])
RELATIONS = ("left", "right", "above", "below")
QUESTION_TYPES = ("existence", "attribute", "counting", "spatial")
NEGATIVES = ("random", "popular", "adversarial")  # POPE's three ways to choose an absent object
POST_PROMPT = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's short-answer suffix
MAX_COUNT = 4


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    x: int  # bounding-box centre, px
    y: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    pixels: np.ndarray  # (336, 336, 3) uint8
    objects: list[Obj]
    owner: np.ndarray  # (336, 336) int8: index of the object drawn at each pixel, -1 = background
    background: str  # "cluttered" | "textured"

    def patch_owner(self, min_cover: float = 0.25) -> np.ndarray:
        """Per patch (576, row-major), the index of the object covering at least ``min_cover`` of it (most
        coverage wins), -1 = background."""
        owner = np.full(GRID * GRID, -1, np.int64)
        if not self.objects:
            return owner
        blocks = self.owner.reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID * GRID, -1)
        cover = np.stack([(blocks == k).mean(1) for k in range(len(self.objects))])  # (objects, 576)
        covered = cover.max(0) >= min_cover
        owner[covered] = cover.argmax(0)[covered]
        return owner

    def patch_labels(self, min_cover: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
        """Per patch, the colour and shape class of the object covering it (``patch_owner``), 0 = background;
        colours 1..7 and shapes 1..4 in the order of the tables."""
        return self._colour_shape(self.patch_owner(min_cover))

    def _colour_shape(self, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        colour_of = np.array([0] + [list(COLOURS).index(o.colour) + 1 for o in self.objects])
        shape_of = np.array([0] + [SHAPES.index(o.shape) + 1 for o in self.objects])
        return colour_of[owner + 1], shape_of[owner + 1]

    def patch_targets(self, min_cover: float = 0.25) -> dict[str, np.ndarray]:
        """What the tower learns to see at each patch (576, row-major; 0 = background): ``colour`` 1..7, the
        colour-shape ``kind`` 1..28 (KINDS order), ``size`` 1 small / 2 large, and ``centre``: 1 on the one
        patch that holds each object's centre, so that objects can be counted, not only their patches."""
        owner = self.patch_owner(min_cover)
        colour, shape = self._colour_shape(owner)
        size_of = np.array([0] + [list(SIZES).index(o.size) + 1 for o in self.objects])
        centre = np.zeros(GRID * GRID, np.int64)
        for o in self.objects:
            centre[(o.y // PATCH) * GRID + o.x // PATCH] = 1
        kind = np.where(colour > 0, (colour - 1) * len(SHAPES) + shape, 0)
        return {"colour": colour, "kind": kind, "size": size_of[owner + 1], "centre": centre}

    def presence(self) -> np.ndarray:
        """Multi-hot over KINDS: which colour-shape kinds the picture holds."""
        hot = np.zeros(len(KINDS), np.float32)
        for o in self.objects:
            hot[KINDS.index((o.colour, o.shape))] = 1.0
        return hot


def _mask(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) silhouette, drawn on a 2x-resolution grid and reduced by majority (no Pillow)."""
    n = 2 * side
    y, x = np.mgrid[0:n, 0:n]
    x, y = 2 * x - (n - 1), 2 * y - (n - 1)  # odd integer coordinates centred on 0, in [-(n-1), n-1]
    r = n - 1
    if shape == "circle":
        m = x * x + y * y <= r * r
    elif shape == "square":
        m = (np.abs(x) <= r * 85 // 100) & (np.abs(y) <= r * 85 // 100)
    elif shape == "triangle":  # apex up: half-width grows linearly from the top edge to the base
        m = (y >= -r) & (2 * np.abs(x) <= y + r)
    elif shape == "cross":
        arm = r // 3
        m = ((np.abs(x) <= arm) & (np.abs(y) <= r)) | ((np.abs(y) <= arm) & (np.abs(x) <= r))
    else:
        raise ValueError(f"unknown shape {shape!r}; shapes: {SHAPES}")
    return m.reshape(side, 2, side, 2).sum((1, 3)) >= 2


_MASKS = {(s, px): _mask(s, px) for s in SHAPES for px in SIZES.values()}


def _background(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Muted, low-saturation texture (blurred noise blobs) or clutter (grey strokes and specks), plus grain."""
    kind = "textured" if rng.integers(2) else "cluttered"
    base = rng.integers(35, 95, 3)
    if kind == "textured":  # a coarse 7x7 grid of tones, upsampled 48x and box-blurred along both axes
        coarse = rng.integers(-25, 26, (7, 7, 1)) + rng.integers(-8, 9, (7, 7, 3))
        field = np.repeat(np.repeat(coarse, 48, 0), 48, 1)
        for axis in (0, 1):
            c = np.cumsum(np.pad(field, [(16, 15) if a == axis else (0, 0) for a in range(3)], mode="edge"), axis)
            c = np.concatenate([np.zeros_like(c.take([0], axis)), c], axis)
            field = (c.take(range(32, 32 + SIZE), axis) - c.take(range(0, SIZE), axis)) // 32
        img = base + field
    else:
        img = np.broadcast_to(base, (SIZE, SIZE, 3)).copy()
        for _ in range(int(rng.integers(25, 45))):  # thin axis-aligned strokes in greys near the base tone
            tone = rng.integers(-30, 31)
            x0, y0 = rng.integers(0, SIZE, 2)
            length, width = int(rng.integers(15, 70)), int(rng.integers(1, 4))
            if rng.integers(2):
                img[y0:y0 + width, x0:x0 + length] += tone
            else:
                img[y0:y0 + length, x0:x0 + width] += tone
        for _ in range(int(rng.integers(40, 80))):  # specks
            x0, y0 = rng.integers(0, SIZE - 3, 2)
            img[y0:y0 + 3, x0:x0 + 3] += rng.integers(-35, 36)
    img = img + rng.integers(-6, 7, (SIZE, SIZE, 3))
    return np.clip(img, 0, 255).astype(np.uint8), kind


def draw_scene(rng: np.random.Generator, n_objects: int | None = None, max_objects: int = 6) -> Scene:
    """1-``max_objects`` (6) non-overlapping objects of distinct colour-shape kinds, each with a little colour jitter."""
    pixels, kind = _background(rng)
    pixels = pixels.astype(np.int16)
    owner = np.full((SIZE, SIZE), -1, np.int8)
    n = int(rng.integers(1, max_objects + 1)) if n_objects is None else n_objects
    kinds = rng.choice(len(KINDS), size=n, replace=False, p=KIND_PRIOR)
    objects: list[Obj] = []
    boxes: list[tuple[int, int, int]] = []
    for k in kinds:
        colour, shape = KINDS[k]
        size = ("small", "large")[int(rng.integers(2))]
        side = SIZES[size]
        for _ in range(200):  # rejection sampling: keep an 8 px gap between bounding boxes
            x0, y0 = (int(v) for v in rng.integers(4, SIZE - side - 4, 2))
            if all(x0 + side + 8 <= bx or bx + bs + 8 <= x0 or y0 + side + 8 <= by or by + bs + 8 <= y0
                   for bx, by, bs in boxes):
                break
        else:
            continue  # no room left: the scene has fewer objects
        mask = _MASKS[(shape, side)]
        rgb = np.clip(np.array(COLOURS[colour]) + rng.integers(-12, 13, 3), 0, 255)
        region = pixels[y0:y0 + side, x0:x0 + side]
        region[mask] = rgb
        owner[y0:y0 + side, x0:x0 + side][mask] = len(objects)
        boxes.append((x0, y0, side))
        objects.append(Obj(colour, shape, size, x0 + side // 2, y0 + side // 2))
    return Scene(pixels.astype(np.uint8), objects, owner, kind)


# ---- questions ---------------------------------------------------------------------------------------------

def _existence(rng, scene: Scene, negatives: str) -> tuple[str, str]:
    present = {(o.colour, o.shape) for o in scene.objects}
    if rng.integers(2):
        colour, shape = sorted(present)[int(rng.integers(len(present)))]
        answer = "yes"
    else:
        absent = [k for k in KINDS if k not in present]
        if negatives == "popular":
            pool = [k for k in POPULAR if k not in present] or absent
        elif negatives == "adversarial":  # share a colour or a shape with a drawn object: the hard negatives
            pool = [k for k in absent if any(k[0] == c or k[1] == s for c, s in present)] or absent
        else:
            pool = absent
        colour, shape = pool[int(rng.integers(len(pool)))]
        answer = "no"
    return f"Is there a {colour} {shape} in the image?", answer


def _attribute(rng, scene: Scene) -> tuple[str, str] | None:
    asks = []
    for o in scene.objects:
        if sum(p.shape == o.shape for p in scene.objects) == 1:
            asks.append((f"What colour is the {o.shape}?", o.colour))
        if sum(p.colour == o.colour for p in scene.objects) == 1:
            asks.append((f"What shape is the {o.colour} object?", o.shape))
        asks.append((f"What size is the {o.name}?", o.size))
    return asks[int(rng.integers(len(asks)))] if asks else None


def _counting(rng, scene: Scene) -> tuple[str, str] | None:
    asks = []
    for c in COLOURS:
        n = sum(o.colour == c for o in scene.objects)
        asks.append((f"How many {c} objects are there?", n))
    for s in SHAPES:
        n = sum(o.shape == s for o in scene.objects)
        asks.append((f"How many {s}s are there?", n))
    if len(scene.objects) <= MAX_COUNT:
        asks.append(("How many objects are there?", len(scene.objects)))
    # balance the answers: draw the count first, then a question with that answer
    asks = [(q, n) for q, n in asks if n <= MAX_COUNT]
    counts = sorted({n for _, n in asks})
    n = counts[int(rng.integers(len(counts)))]
    chosen = [q for q, m in asks if m == n]
    return chosen[int(rng.integers(len(chosen)))], str(n)


def relation(a: Obj, b: Obj) -> str | None:
    """Where ``a`` is relative to ``b``, when one axis clearly dominates (else None: ambiguous)."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= 2 * abs(dy) and abs(dx) >= 40:
        return "left" if dx < 0 else "right"
    if abs(dy) >= 2 * abs(dx) and abs(dy) >= 40:
        return "above" if dy < 0 else "below"
    return None


def _spatial(rng, scene: Scene) -> tuple[str, str] | None:
    pairs = [(a, b, r) for a in scene.objects for b in scene.objects if a is not b and (r := relation(a, b))]
    if not pairs:
        return None
    a, b, r = pairs[int(rng.integers(len(pairs)))]
    return f"Where is the {a.name} relative to the {b.name}?", r


def ask(rng: np.random.Generator, scene: Scene, kind: str, negatives: str = "random") -> tuple[str, str] | None:
    """One (question, answer) of type ``kind`` about ``scene``, or None when the scene cannot pose it."""
    if kind == "existence":
        return _existence(rng, scene, negatives)
    return {"attribute": _attribute, "counting": _counting, "spatial": _spatial}[kind](rng, scene)


def caption(scene: Scene) -> str:
    """Every object, top to bottom: "small red circle , large blue square" (the training split's description turn)."""
    return " , ".join(f"{o.size} {o.colour} {o.shape}" for o in sorted(scene.objects, key=lambda o: (o.y, o.x)))


DESCRIBE = "Describe the image."


def vocabulary() -> list[str]:
    """Every word a pocket question, answer or chat turn can hold (the tokenizer's training text)."""
    words = ["Is", "there", "a", "in", "the", "image", "What", "colour", "is", "shape", "object", "size", "How",
             "many", "objects", "are", "Where", "relative", "to", "Answer", "question", "using", "single", "word",
             "or", "phrase", "Describe", "USER", "ASSISTANT", "yes", "no", "?", ".", ":", ","]
    words += list(COLOURS) + list(SHAPES) + [f"{s}s" for s in SHAPES] + list(SIZES) + list(RELATIONS)
    words += [str(n) for n in range(MAX_COUNT + 1)]
    return list(dict.fromkeys(words))

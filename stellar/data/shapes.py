"""The embedded dataset: seeded synthetic images of filled shapes over textured backgrounds.

Layout (an ImageFolder tree, generated once into a cache folder):

    ROOT/meta.json                       version, seed, counts, class names, mask encoding
    ROOT/train/<kind>/00042.jpg          128 x 128 RGB JPEG; label = kind of the largest shape
    ROOT/val/<kind>/...
    ROOT/masks/train/<kind>/00042.png    its object mask, uint8 L PNG: 0 = background,
                                         k + 1 = a pixel of a shape of kind KINDS[k] (topmost)
    ROOT/masks/val/<kind>/...

The masks sit in a parallel tree (`mask_path` maps an image to its mask) rather than in the
image folders, so that any ImageFolder reader (ours, torchvision's, DALI's file reader) sees
only the images under ROOT/train and ROOT/val.

Each image holds one main shape (the largest, its kind is the label; radius 30-42 % of the
image) and 0-2 much smaller distractor shapes of any kind, at random sizes, positions and
rotations. Shapes are light grey over a darker, low-contrast textured background: colour and
brightness vary little from image to image on purpose. A short self-supervised run learns the
strongest cue shared by the views of an image; with random saturated colours (shapes-v1) that
cue was colour, and kNN on the shape label stayed at chance, whereas here it is the silhouette.
Every image is a pure function of (seed, split, index), so the tree is the same wherever it is
generated. The default ROOT is $STELLAR_DATA/shapes-v2, or ~/.cache/stellar/shapes-v2.
"""
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageDraw

VERSION = "shapes-v2"
KINDS = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "arrow")
SPLITS = ("train", "val")
# Grey levels (0-255): shapes are drawn in SHAPE_GREY, the background's mean is drawn from
# BACKGROUND_GREY and its texture keeps TEXTURE_CONTRAST of _texture's contrast.
SHAPE_GREY = (200.0, 255.0)
BACKGROUND_GREY = (50.0, 90.0)
TEXTURE_CONTRAST = 0.3
MAIN_RADIUS = (0.3, 0.42)         # fraction of the image size
DISTRACTOR_RADIUS = (0.2, 0.4)    # fraction of the main shape's radius
MAX_DISTRACTORS = 2
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def mask_path(image_path: Union[str, Path]) -> Path:
    """ROOT/<split>/<kind>/<stem>.jpg -> ROOT/masks/<split>/<kind>/<stem>.png."""
    p = Path(image_path)
    return p.parents[2] / "masks" / p.parent.parent.name / p.parent.name / (p.stem + ".png")


def default_root() -> Path:
    """$STELLAR_DATA/<VERSION> when STELLAR_DATA is set, else ~/.cache/stellar/<VERSION>."""
    base = os.environ.get("STELLAR_DATA")
    base = Path(base) if base else Path.home() / ".cache" / "stellar"
    return base / VERSION


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------


def _polygon(kind):
    """Unit outline of a polygonal kind, centred at 0 with radius about 1: list of (x, y)."""
    if kind in ("square", "triangle", "hexagon"):
        n = {"square": 4, "triangle": 3, "hexagon": 6}[kind]
        return [(math.cos(2 * math.pi * k / n), math.sin(2 * math.pi * k / n)) for k in range(n)]
    if kind == "star":
        return [
            ((1.0 if k % 2 == 0 else 0.42) * math.cos(math.pi * k / 5), (1.0 if k % 2 == 0 else 0.42) * math.sin(math.pi * k / 5))
            for k in range(10)
        ]
    if kind == "cross":
        a = 0.32
        return [(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1), (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)]
    if kind == "arrow":
        return [(-1, -0.22), (0.15, -0.22), (0.15, -0.62), (1, 0), (0.15, 0.62), (0.15, 0.22), (-1, 0.22)]
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _shape_mask(kind, cx, cy, radius, angle, size):
    """Binary L mask (0/255) of one shape: centre (cx, cy), radius in pixels, angle in radians."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if kind in ("circle", "ring"):
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        if kind == "ring":
            r = 0.55 * radius
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=0)
        return mask
    c, s = math.cos(angle), math.sin(angle)
    points = [(cx + radius * (c * x - s * y), cy + radius * (s * x + c * y)) for x, y in _polygon(kind)]
    draw.polygon(points, fill=255)
    return mask


def _texture(rng, size):
    """A coloured texture: uint8 [size, size, 3] from one of four texture families."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(0.15, 0.85, size=3).astype(np.float32)
    other = np.clip(base + rng.uniform(-0.35, 0.35, size=3), 0, 1).astype(np.float32)
    family = rng.integers(4)
    if family == 0:  # linear gradient at a random angle
        a = rng.uniform(0, 2 * math.pi)
        t = (np.cos(a) * xx + np.sin(a) * yy)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif family == 1:  # sinusoidal stripes
        a = rng.uniform(0, math.pi)
        freq = rng.uniform(3, 12)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (np.cos(a) * xx + np.sin(a) * yy) + rng.uniform(0, 6.3))
    elif family == 2:  # checkerboard
        cells = rng.integers(4, 12)
        t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(np.float32)
    else:  # smooth blobs: low-resolution noise upsampled bilinearly
        low = rng.uniform(0, 1, size=(int(rng.integers(3, 8)),) * 2)
        t = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR), np.float32) / 255
    img = base[None, None, :] * (1 - t[..., None]) + other[None, None, :] * t[..., None]
    img = img + rng.normal(0, 0.04, size=img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _background(rng, size):
    """The grey background: _texture's luma at TEXTURE_CONTRAST around a mean drawn from
    BACKGROUND_GREY. float32 [size, size] in 0-255."""
    luma = _texture(rng, size).astype(np.float32) @ LUMA
    return rng.uniform(*BACKGROUND_GREY) + TEXTURE_CONTRAST * (luma - luma.mean())


def render_sample(seed: int, split: str, index: int, size: int = 128):
    """One sample, a pure function of (seed, split, index).

    Returns (image: PIL RGB [size, size], mask: PIL L [size, size], label: int); the label is
    index % len(KINDS), so classes are balanced.
    """
    rng = np.random.default_rng([int(seed), SPLITS.index(split), int(index)])
    label = index % len(KINDS)
    grey = _background(rng, size)
    labels = Image.new("L", (size, size), 0)

    main_r = rng.uniform(*MAIN_RADIUS) * size
    main = (KINDS[label], *rng.uniform(main_r * 0.9, size - main_r * 0.9, size=2), main_r)
    distractors = []
    for _ in range(int(rng.integers(0, MAX_DISTRACTORS + 1))):
        # radius at most 0.4 of the main one: smaller in area whatever the two kinds are
        r = rng.uniform(*DISTRACTOR_RADIUS) * main_r
        distractors.append((KINDS[int(rng.integers(len(KINDS)))], *rng.uniform(0, size, size=2), r))
    on_top = len(distractors) if rng.uniform() < 0.7 else max(len(distractors) - 1, 0)
    order = distractors[:on_top] + [main] + distractors[on_top:]

    for kind, cx, cy, r in order:
        mask = _shape_mask(kind, float(cx), float(cy), float(r), float(rng.uniform(0, 2 * math.pi)), size)
        inside = np.asarray(mask) > 0
        grey[inside] = rng.uniform(*SHAPE_GREY)
        labels.paste(KINDS.index(kind) + 1, (0, 0), mask)
    image = np.repeat(grey[..., None], 3, axis=2)
    noise = rng.normal(0, 4, size=(size, size, 3))
    image = Image.fromarray(np.clip(image + noise, 0, 255).astype(np.uint8))
    return image, labels, label


# ----------------------------------------------------------------------------------------------
# The cached tree
# ----------------------------------------------------------------------------------------------


def _meta(n_train, n_val, size, seed):
    return {
        "version": VERSION,
        "seed": int(seed),
        "size": int(size),
        "counts": {"train": int(n_train), "val": int(n_val)},
        "classes": list(KINDS),
        "mask": "masks/<split>/<class>/<stem>.png, uint8 L: 0 background, k+1 = kind classes[k] (topmost)",
    }


def generate_shapes_dataset(out_dir: Union[str, Path], n_train: int = 2400, n_val: int = 600, size: int = 128, seed: int = 0) -> Path:
    """Write the tree into `out_dir` (which must not exist yet); meta.json is written last."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    for split, count in (("train", n_train), ("val", n_val)):
        for kind in KINDS:
            (out_dir / split / kind).mkdir(parents=True)
            (out_dir / "masks" / split / kind).mkdir(parents=True)
        for i in range(count):
            image, mask, label = render_sample(seed, split, i, size)
            path = out_dir / split / KINDS[label] / f"{i:05d}.jpg"
            image.save(path, quality=90)
            mask.save(mask_path(path))
    (out_dir / "meta.json").write_text(json.dumps(_meta(n_train, n_val, size, seed), indent=1))
    return out_dir


def ensure_shapes_dataset(
    root: Optional[Union[str, Path]] = None, n_train: int = 2400, n_val: int = 600, size: int = 128, seed: int = 0
) -> Path:
    """Return the embedded dataset's folder, generating it on first use (about 20 s, one core).

    root: the dataset folder (default `default_root()`). Generation goes to a temporary
    sibling folder that is renamed into place, so an interrupted run leaves no half tree and
    concurrent callers agree. A folder holding a dataset with other parameters is an error.
    """
    for name, v in (("n_train", n_train), ("n_val", n_val), ("size", size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name != "size" else 16):
            raise ValueError(f"{name} must be a positive int (size >= 16), got {v!r}")
    root = Path(root).expanduser() if root is not None else default_root()
    want = _meta(n_train, n_val, size, seed)
    meta_path = root / "meta.json"
    if not meta_path.exists():
        if root.exists() and any(root.iterdir()):
            raise ValueError(f"root {root} exists, is not empty and holds no meta.json: not a shapes dataset")
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            generate_shapes_dataset(tmp, n_train, n_val, size, seed)
            if root.exists():
                root.rmdir()  # an empty folder left by the caller
            os.rename(tmp, root)
        except OSError:
            if not meta_path.exists():  # not a lost race with another generator
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    have = json.loads(meta_path.read_text())
    if have != want:
        raise ValueError(f"root {root} holds a shapes dataset with other parameters: {have} (asked {want})")
    return root

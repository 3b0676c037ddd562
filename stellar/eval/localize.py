"""Do the concept maps find the objects? IoU of each object's mask with its best concept map.

    res = evaluate_localization(model, masked_images(root, "val"), image_size=64)
    res["miou"]        # mean over objects of max_j IoU(object, segment_j), in [0, 1]

The rule, per image (``image_size`` px, the model's input):
1. The concept maps are the columns of L reshaped to the patch grid ([r, h, w]), upsampled
   bilinearly to the image's pixels.
2. **Segments**: each pixel belongs to the concept whose map is largest there (L is a softmax over
   the r concepts, so this is the hard assignment its soft one approximates; no free parameter).
   ``threshold=t`` instead makes segment j the pixels where map j >= t (segments may overlap or
   leave pixels out).
3. **Objects**: every value of the mask other than 0 (background) and ``ignore_index`` (255,
   e.g. VOC's boundaries, left out of every set) is one object. The embedded shapes masks give a
   shape's kind + 1, so two shapes of the same kind in one image count as one object.
4. Score of an object: the largest IoU over the r segments. ``miou``: the mean over all objects of
   all images; ``iou_largest``: the mean over images of the largest object's score.
   ``whole_image``: the same mean for a segment that covers the whole image (|object| / |image|),
   the score of a model that localizes nothing.

Data: ``masked_images(root, split)`` reads the embedded shapes layout (``ROOT/<split>/<class>/x.jpg``
with ``ROOT/masks/<split>/<class>/x.png``, ``stellar.data.shapes.mask_path``); ``masked_images(dir,
masks=MDIR)`` any folder of images with one PNG mask per image under MDIR with the same stem (any
depth; 8-bit L or palette PNG, values = object or class ids). Masks are cropped and resized like
the images (centre square, nearest neighbour).

No public anchor reports this score: it is this project's. Runs in one process.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .features import _autocast, resolve_device

IGNORE = 255


# --------------------------------------------------------------------------- data

class MaskedImages(torch.utils.data.Dataset):
    """Pairs (image path, mask path) -> (image Tensor[3,S,S] in [0,1], mask LongTensor[S,S]).

    With ``image_size=None``, ``__getitem__`` returns the decoded uint8 image and the full-size
    mask; ``at(size)`` gives a view that crops and resizes.
    """

    def __init__(self, pairs: list[tuple[Path, Path]], image_size: int | None = None, classes: list[str] | None = None):
        if not pairs:
            raise ValueError("no images with masks were found")
        self.pairs = list(pairs)
        self.image_size = image_size
        self.classes = classes

    def at(self, image_size: int) -> "MaskedImages":
        return MaskedImages(self.pairs, image_size, self.classes)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        from stellar.data.folder import decode_image

        from .knn import prepare_images

        image_path, mask_path = self.pairs[i]
        image = decode_image(image_path)
        mask = read_mask(mask_path)
        if tuple(mask.shape) != tuple(image.shape[1:]):
            raise ValueError(f"mask {mask_path} is {tuple(mask.shape)} px but its image {image_path} is "
                             f"{tuple(image.shape[1:])} px")
        if self.image_size is None:
            return image, mask
        return prepare_images([image], self.image_size)[0], prepare_mask(mask, self.image_size)


def read_mask(path: str | os.PathLike) -> Tensor:
    """A PNG label mask -> LongTensor[H, W] (8-bit grey or palette indices)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"mask {path} must be a single-channel (L or palette) PNG, got mode {im.mode}")
        return torch.from_numpy(np.asarray(im).astype(np.int64))


def prepare_mask(mask: Tensor, size: int) -> Tensor:
    """LongTensor[H, W] -> LongTensor[size, size]: the centre square (as ``prepare_images``), nearest resize."""
    h, w = mask.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    m = mask[top:top + side, left:left + side]
    if side != size:
        m = F.interpolate(m[None, None].float(), size=(size, size), mode="nearest-exact")[0, 0].long()
    return m


def masked_images(root: str | os.PathLike | None = None, split: str | None = "val",
                  masks: str | os.PathLike | None = None) -> MaskedImages:
    """Images with their masks: the embedded shapes layout (``root`` default: the embedded set), or
    ``root`` + a ``masks`` folder of PNGs with the images' stems."""
    from stellar.data.folder import list_images, IMAGE_EXTS

    if root is None:
        from stellar.data.shapes import ensure_shapes_dataset

        root = ensure_shapes_dataset()
    root = Path(root)
    if masks is None:
        from stellar.data.shapes import mask_path

        folder = root / split if split else root
        if not (root / "masks").is_dir() or not folder.is_dir():
            raise ValueError(f"--data {root} is not in the shapes layout (ROOT/{split}/<class>/x.jpg with "
                             f"ROOT/masks/{split}/<class>/x.png); `stellar eval localize` also takes any "
                             f"folder of images with --masks MDIR")
        paths, _, _ = list_images(folder, IMAGE_EXTS)
        pairs = [(p, mask_path(p)) for p in paths]
        meta = root / "meta.json"                   # the mask values' names: classes[k] is value k + 1
        classes = json.loads(meta.read_text()).get("classes") if meta.is_file() else None
        absent = [str(m) for _, m in pairs if not m.is_file()]
        if absent:
            raise ValueError(f"{len(absent)} images under {folder} have no mask (first: {absent[0]})")
        return MaskedImages(pairs, classes=classes)
    masks = Path(masks)
    if not masks.is_dir():
        raise ValueError(f"--masks {masks} is not a folder")
    by_stem: dict[str, Path] = {}
    for m in sorted(masks.rglob("*.png")):
        if m.stem in by_stem:
            raise ValueError(f"--masks {masks}: two masks share the stem {m.stem!r} ({by_stem[m.stem]}, {m})")
        by_stem[m.stem] = m
    folder = root / split if split and (root / split).is_dir() else root
    mask_files = {m.resolve() for m in by_stem.values()}
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                    and p.resolve() not in mask_files)
    counts = Counter(p.stem for p in images)
    twice = sorted(s for s, n in counts.items() if n > 1)
    if twice:
        raise ValueError(f"--data {folder}: several images share a stem, so a mask cannot be told apart: {twice[:5]}")
    pairs = [(p, by_stem[p.stem]) for p in images if p.stem in by_stem]
    if len(pairs) < len(images):
        missing = [str(p) for p in images if p.stem not in by_stem]
        raise ValueError(f"{len(missing)} images under {folder} have no mask in {masks} (first: {missing[0]})")
    return MaskedImages(pairs)


# --------------------------------------------------------------------------- the score

def segments(maps: Tensor, size: int, threshold: float | None = None) -> Tensor:
    """maps Tensor[B, r, h, w] in [0,1] -> segments BoolTensor[B, r, size, size] (see the module docstring)."""
    up = F.interpolate(maps.float(), size=(size, size), mode="bilinear", align_corners=False)
    if threshold is None:
        best = up.argmax(dim=1, keepdim=True)                                    # B x 1 x S x S
        return torch.arange(maps.shape[1], device=maps.device).view(1, -1, 1, 1) == best
    return up >= threshold


def object_ious(seg: Tensor, mask: Tensor, ignore_index: int = IGNORE) -> list[tuple[float, int, float]]:
    """One image: seg BoolTensor[r, S, S], mask LongTensor[S, S] ->
    [(best IoU, object pixels, |object| / |valid pixels|) for each object]."""
    valid = mask != ignore_index
    seg = seg & valid
    seg_area = seg.sum(dim=(1, 2))                                               # r
    total = int(valid.sum())
    out = []
    for value in torch.unique(mask[valid]).tolist():
        if value == 0:
            continue
        obj = mask == value
        area = int(obj.sum())
        inter = (seg & obj).sum(dim=(1, 2))                                      # r
        iou = inter.double() / (seg_area + area - inter).double()
        out.append((float(iou.max()), area, area / total))
    return out


@torch.no_grad()
def evaluate_localization(model: torch.nn.Module, data: MaskedImages, image_size: int, batch_size: int = 64,
                          device: str | torch.device = "cpu", threshold: float | None = None,
                          ignore_index: int = IGNORE, amp: str = "auto", num_workers: int = 0) -> dict:
    """The localization score of ``model`` on ``data`` (see the module docstring).

    Returns ``{"miou", "iou_largest", "whole_image", "num_objects", "num_images", "rule",
    "image_size"}``.
    """
    from .concept_maps import concept_maps

    device = resolve_device(device)
    loader = torch.utils.data.DataLoader(data.at(image_size), batch_size=batch_size, num_workers=num_workers)
    was_training = model.training
    model.eval()
    scores, largest, whole, images = [], [], [], 0
    try:
        for x, masks in loader:
            with _autocast(device, amp):
                maps = concept_maps(model, x.to(device))                          # B x r x h x w
            seg = segments(maps, image_size, threshold).cpu()
            for b in range(x.shape[0]):
                objs = object_ious(seg[b], masks[b], ignore_index)
                images += 1
                if not objs:
                    continue
                scores += [o[0] for o in objs]
                whole += [o[2] for o in objs]
                largest.append(max(objs, key=lambda o: o[1])[0])
    finally:
        model.train(was_training)
    if not scores:
        raise ValueError("no object pixels in any mask (0 is background, 255 ignored)")
    rule = "argmax over concepts" if threshold is None else f"L >= {threshold:g}"
    return {"miou": float(np.mean(scores)), "iou_largest": float(np.mean(largest)),
            "whole_image": float(np.mean(whole)), "num_objects": len(scores), "num_images": images,
            "rule": rule, "image_size": int(image_size)}

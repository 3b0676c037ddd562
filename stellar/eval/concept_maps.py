"""Concept maps (STELLAR.md section 7): the localization matrix L reshaped to the patch grid.

    save_concept_maps(model, images, "maps.png")

One row per image: the image, then its r concept maps (column j = L[:, j] on the h x w grid,
upsampled to the tile, coloured and laid over the greyscale image). Colours show L's own values
in [0, 1] (a concept absent from the image stays dark); its peak max_n L[n, j] is written under it.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

# Anchor colours of a dark-to-bright heat map (black, purple, red, orange, pale yellow).
_ANCHORS = torch.tensor([[0, 0, 4], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]],
                        dtype=torch.float32) / 255.0


def colormap(values: Tensor) -> Tensor:
    """values Tensor[...] in [0,1] -> RGB Tensor[..., 3] in [0,1] (piecewise-linear heat map)."""
    v = values.clamp(0, 1) * (len(_ANCHORS) - 1)
    lo = v.floor().long().clamp(max=len(_ANCHORS) - 2)
    frac = (v - lo).unsqueeze(-1)
    return _ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac


def grid_shape(num_patches: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) patch grid of an H x W image with ``num_patches`` patches, row-major."""
    h = round(math.sqrt(num_patches * height / width))
    if h < 1 or num_patches % h:
        raise ValueError(f"{num_patches} patches do not form a grid for a {height}x{width} image")
    return h, num_patches // h


@torch.no_grad()
def concept_maps(model: torch.nn.Module, images: Tensor) -> Tensor:
    """images Tensor[B, 3, H, W] in [0,1] -> maps Tensor[B, r, h, w] (L[b, :, j] on the patch grid)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be Tensor[B,3,H,W], got {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    L = model.encode(images)["L"].float()                                      # B x N x r
    model.train(was_training)
    h, w = grid_shape(L.shape[1], images.shape[2], images.shape[3])
    return L.transpose(1, 2).reshape(L.shape[0], L.shape[2], h, w)


def render_concept_maps(images: Tensor, maps: Tensor, tile: int = 96, gap: int = 4) -> Image.Image:
    """images Tensor[B,3,H,W] in [0,1], maps Tensor[B,r,h,w] in [0,1] -> one PIL image (B rows, 1+r columns)."""
    B, r = maps.shape[:2]
    if images.shape[0] != B:
        raise ValueError(f"images ({images.shape[0]}) and maps ({B}) must hold the same number of images")
    label_h = 12
    sheet = Image.new("RGB", (gap + (1 + r) * (tile + gap), gap + B * (tile + label_h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    pics = F.interpolate(images.float().cpu().clamp(0, 1), size=(tile, tile), mode="bilinear",
                         align_corners=False, antialias=True)                  # B x 3 x tile x tile
    grey = (0.299 * pics[:, 0] + 0.587 * pics[:, 1] + 0.114 * pics[:, 2])        # B x tile x tile
    up = F.interpolate(maps.float().cpu(), size=(tile, tile), mode="nearest")   # B x r x tile x tile
    for b in range(B):
        y = gap + b * (tile + label_h + gap)
        sheet.paste(_to_pil(pics[b].permute(1, 2, 0)), (gap, y))
        for j in range(r):
            peak = maps[b, j].max().item()
            heat = colormap(up[b, j])                                          # tile x tile x 3
            blend = 0.7 * heat + 0.3 * grey[b].unsqueeze(-1)
            x = gap + (1 + j) * (tile + gap)
            sheet.paste(_to_pil(blend), (x, y))
            draw.text((x + 2, y + tile), f"{j}: max {peak:.2f}", fill=(0, 0, 0))
    return sheet


def _to_pil(rgb: Tensor) -> Image.Image:
    """Tensor[H, W, 3] in [0,1] -> PIL RGB image."""
    return Image.fromarray((rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy())


def save_concept_maps(model: torch.nn.Module, images: Tensor, path: str | os.PathLike, tile: int = 96) -> Path:
    """Compute and write the concept-map sheet of ``images: Tensor[B,3,H,W]`` in [0,1] as a PNG."""
    device = next(model.parameters()).device
    maps = concept_maps(model, images.to(device))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_concept_maps(images, maps, tile=tile).save(path, format="PNG")
    return path


def load_images(paths, size: int) -> Tensor:
    """Image files -> Tensor[B, 3, size, size] in [0,1]: the reference decode the loaders and the
    other evaluations use (`stellar.data.decode.decode_file`: RGB, upright by EXIF, 16-bit by the
    high byte), then the centre square crop and resize (`prepare_images`)."""
    from stellar.data.decode import decode_file

    from .knn import prepare_images

    return prepare_images([decode_file(p) for p in paths], size)

"""Random patch masking of the masked global views (STELLAR.md section 5).

Each view keeps ``n_keep = int(N * (1 - mask_ratio))`` of its N = grid_h * grid_w patches, the
public code's count: with ``mask_ratio = 0.8`` that is 39 of 196, and 19 of 100 (``1 - 0.8`` is
0.19999999999999996 in floating point, so a 10 x 10 grid keeps 19, not 20); CLS and sparse tokens
are always kept by the model, not here. Patches with the
lowest keep-noise are kept. The noise is uniform; with probability ``focal_prob`` per view
a focal variant biases it:

- ``"gaussian"``: ``noise -= exp(-dist^2 / (2 sigma^2))`` around a blob whose centre is a
  uniformly drawn grid cell (integer row and column, as the public code) and whose sigma is
  uniform in (0.1, 0.5) x the grid side. Distances are measured in grid-normalized
  coordinates (patch (i, j) sits at ((j + 0.5) / w, (i + 0.5) / h)), so on a non-square grid
  "the grid side" is each axis's own length.
- ``"block"``: a square block of side ``min(isqrt(n_keep), grid_h, grid_w)`` at a uniform
  position is kept whole (its noise is lowered by 1, below every other patch); the remaining
  ``n_keep - side^2`` patches are drawn at random from the rest.

The indices are drawn with ``generator`` (on its device, or on ``device`` without one) so a
loader can draw them on the host and keep shapes static in the step.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["num_keep", "sample_keep_indices", "gather_patches"]

_FOCAL = (None, "gaussian", "block")


def num_keep(num_patches: int, mask_ratio: float) -> int:
    """``int(num_patches * (1 - mask_ratio))`` (the public code's count), checked to be >= 1."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    n_keep = int(num_patches * (1 - mask_ratio))
    if n_keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no patch of {num_patches}")
    return n_keep


def _gaussian_bias(batch: int, grid_h: int, grid_w: int, generator, device) -> Tensor:
    """exp(-dist^2 / (2 sigma^2)) per view and patch: Tensor[batch, grid_h * grid_w]."""
    cy = torch.randint(0, grid_h, (batch,), generator=generator, device=device)       # integer cell
    cx = torch.randint(0, grid_w, (batch,), generator=generator, device=device)
    centre = torch.stack([(cy + 0.5) / grid_h, (cx + 0.5) / grid_w], dim=1)           # batch x (y, x)
    sigma = 0.1 + 0.4 * torch.rand(batch, 1, generator=generator, device=device)      # (0.1, 0.5)
    ys = (torch.arange(grid_h, device=device, dtype=torch.float32) + 0.5) / grid_h
    xs = (torch.arange(grid_w, device=device, dtype=torch.float32) + 0.5) / grid_w
    dy = ys.view(1, grid_h, 1) - centre[:, 0].view(batch, 1, 1)                      # batch x h x 1
    dx = xs.view(1, 1, grid_w) - centre[:, 1].view(batch, 1, 1)                      # batch x 1 x w
    dist2 = (dy.square() + dx.square()).reshape(batch, grid_h * grid_w)               # batch x N
    return torch.exp(-dist2 / (2 * sigma.square()))


def _block_bias(batch: int, grid_h: int, grid_w: int, n_keep: int, generator, device) -> Tensor:
    """1 inside a random square block of side min(isqrt(n_keep), h, w), else 0: Tensor[batch, N]."""
    side = min(math.isqrt(n_keep), grid_h, grid_w)
    top = torch.randint(0, grid_h - side + 1, (batch, 1, 1), generator=generator, device=device)
    left = torch.randint(0, grid_w - side + 1, (batch, 1, 1), generator=generator, device=device)
    rows = torch.arange(grid_h, device=device).view(1, grid_h, 1)
    cols = torch.arange(grid_w, device=device).view(1, 1, grid_w)
    inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    return inside.reshape(batch, grid_h * grid_w).float()


def sample_keep_indices(batch: int, grid_h: int, grid_w: int, mask_ratio: float = 0.8,
                        focal: str | None = None, focal_prob: float = 0.5,
                        generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> Tensor:
    """Sorted indices of the patches each view keeps: LongTensor[batch, n_keep].

    ``n_keep = int(grid_h * grid_w * (1 - mask_ratio))``; indices are distinct, in [0, N),
    row-major over the grid, sorted ascending per row. ``focal`` picks the biased variant
    applied to each view with probability ``focal_prob`` (see the module docstring).
    """
    if batch < 0 or grid_h < 1 or grid_w < 1:
        raise ValueError(f"batch must be >= 0 and grid_h, grid_w >= 1, got {batch}, {grid_h}, {grid_w}")
    if focal not in _FOCAL:
        raise ValueError(f"focal must be one of {_FOCAL}, got {focal!r}")
    if not 0.0 <= focal_prob <= 1.0:
        raise ValueError(f"focal_prob must be in [0, 1], got {focal_prob}")
    N = grid_h * grid_w
    n_keep = num_keep(N, mask_ratio)
    out_device = torch.device(device) if device is not None else (
        generator.device if generator is not None else torch.device("cpu"))
    draw = generator.device if generator is not None else out_device

    noise = torch.rand(batch, N, generator=generator, device=draw)                   # batch x N
    if focal is not None:
        apply = torch.rand(batch, 1, generator=generator, device=draw) < focal_prob  # batch x 1
        if focal == "gaussian":
            bias = _gaussian_bias(batch, grid_h, grid_w, generator, draw)
        else:
            bias = _block_bias(batch, grid_h, grid_w, n_keep, generator, draw)
        noise = noise - bias * apply
    keep = noise.argsort(dim=1)[:, :n_keep]                                          # lowest noise
    return keep.sort(dim=1).values.to(out_device)


def gather_patches(x: Tensor, keep: Tensor) -> Tensor:
    """The kept patch tokens: x Tensor[B, N, D], keep LongTensor[B, K] -> Tensor[B, K, D]."""
    if not isinstance(x, Tensor) or x.dim() != 3:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a Tensor[B, N, D], got {got}")
    if (not isinstance(keep, Tensor) or keep.dim() != 2 or keep.shape[0] != x.shape[0]
            or keep.dtype != torch.int64):
        got = (tuple(keep.shape), keep.dtype) if isinstance(keep, Tensor) else type(keep).__name__
        raise ValueError(f"keep must be a LongTensor[B={x.shape[0]}, K], got {got}")
    return torch.gather(x, 1, keep.to(x.device).unsqueeze(-1).expand(-1, -1, x.shape[2]))

"""The decoder's fixed 2-D random-Fourier position encoding (STELLAR.md section 3).

For the patch in row i, column j of an h x w grid: ``(x, y) = ((j+0.5)/w, (i+0.5)/h)``, mapped to
[-1, 1] by ``2c - 1``; ``f = 2 pi (x, y) @ G`` with the frozen Gaussian buffer ``G`` (2, F);
the encoding is ``[sin f_0, cos f_0, sin f_1, cos f_1, ...]`` (2F values), patches row-major.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["RandomFourierPositionEncoding"]


class RandomFourierPositionEncoding(nn.Module):
    """Fixed random-Fourier features of patch centres.

    The buffer is named ``positional_encoding_gaussian_matrix`` (shape ``(2, dim // 2)``) so the
    public checkpoint's ``position_embedding.positional_encoding_gaussian_matrix`` loads as is.
    ``forward(grid_h, grid_w) -> Tensor[grid_h*grid_w, dim]`` (float32, the buffer's device).
    """

    def __init__(self, dim: int = 512, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim must be even (sin/cos pairs), got {dim}")
        self.dim = dim
        self.register_buffer("positional_encoding_gaussian_matrix",
                             torch.randn(2, dim // 2, generator=generator))

    def forward(self, grid_h: int, grid_w: int) -> Tensor:
        G = self.positional_encoding_gaussian_matrix                            # 2 x F
        dev = G.device
        y = (torch.arange(grid_h, device=dev, dtype=G.dtype) + 0.5) / grid_h
        x = (torch.arange(grid_w, device=dev, dtype=G.dtype) + 0.5) / grid_w
        yy, xx = torch.meshgrid(y, x, indexing="ij")                             # h x w
        coords = torch.stack([xx, yy], dim=-1).reshape(-1, 2) * 2 - 1           # N x 2, (x, y)
        f = (2 * math.pi) * (coords @ G)                                         # N x F
        return torch.stack([f.sin(), f.cos()], dim=-1).reshape(grid_h * grid_w, -1)   # N x 2F

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

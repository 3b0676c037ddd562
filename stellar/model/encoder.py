"""The STELLAR encoder: a ViT whose sequence is ``[CLS, patches, sparse]`` (STELLAR.md section 1).

Images come in [0, 1] and are normalized inside with the ImageNet mean/std. The r learned sparse
tokens (init normal, std D^-0.5) are appended after the position embedding and go through the
same blocks; the final-norm outputs split into ``cls [B,1,D]``, ``dense [B,N,D]``,
``sparse [B,r,D]``.

Masked views pass ``keep`` (LongTensor[B, n_keep], patch indices in row-major order): the patches
are embedded (position embedding included), then only the kept ones are gathered; CLS and the
sparse tokens are always kept. ``dense`` is then the kept patches' outputs, in ``keep`` order.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from stellar.constants import IMAGENET_MEAN, IMAGENET_STD
from stellar.nn.vit import VisionTransformer

__all__ = ["SparseTokenEncoder", "IMAGENET_MEAN", "IMAGENET_STD"]



class SparseTokenEncoder(nn.Module):
    """ViT + r sparse tokens. forward(images[B,3,H,W] in [0,1], keep=None) -> (cls, dense, sparse)."""

    def __init__(self, vit: VisionTransformer, num_tokens: int) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        self.vit = vit
        self.num_tokens = num_tokens
        self.sparse_tokens = nn.Parameter(torch.randn(num_tokens, vit.dim) * vit.dim ** -0.5)
        # Constants, not weights (not persistent); float64 so that a float64 model normalizes
        # exactly, cast to the images' dtype at use (float32: the public code's constants).
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1),
                             persistent=False)

    @property
    def dim(self) -> int:
        return self.vit.dim

    @property
    def patch_size(self) -> int:
        return self.vit.patch_size

    def grid(self, images: Tensor) -> tuple[int, int]:
        """(grid_h, grid_w) of patches for images Tensor[..., H, W]."""
        return self.vit.patch_embed.grid(images.shape[-2], images.shape[-1])

    def tokens(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """The input sequence Tensor[B, 1 + n + r, D] (n = N, or n_keep with ``keep``)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a Tensor[B, 3, H, W], got {tuple(images.shape)}")
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        x = self.vit.embed(x)                                              # B x 1+N x D
        if keep is not None:
            B, T, D = x.shape
            if keep.dim() != 2 or keep.shape[0] != B or keep.dtype != torch.long:
                raise ValueError(f"keep must be a LongTensor[B={B}, n_keep], got "
                                 f"{keep.dtype} {tuple(keep.shape)}")
            # Range check on CPU only: on CUDA it would synchronise (gather asserts there anyway).
            if keep.device.type == "cpu" and keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= T - 1):
                raise ValueError(f"keep must hold patch indices in [0, {T - 1}), "
                                 f"got [{int(keep.min())}, {int(keep.max())}]")
            kept = torch.gather(x[:, 1:], 1, keep.unsqueeze(-1).expand(-1, -1, D))   # B x n_keep x D
            x = torch.cat([x[:, :1], kept], dim=1)
        sparse = self.sparse_tokens.unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([x, sparse], dim=1)

    def forward(self, images: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """images: Tensor[B, 3, H, W] in [0, 1]; keep: LongTensor[B, n_keep] or None.

        Returns cls Tensor[B, 1, D], dense Tensor[B, n, D] (n = N or n_keep), sparse Tensor[B, r, D].
        """
        out = self.vit.transformer(self.tokens(images, keep))
        r = self.num_tokens
        return out[:, :1], out[:, 1:-r], out[:, -r:]

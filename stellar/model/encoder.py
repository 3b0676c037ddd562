"""The STELLAR encoder: a ViT whose sequence is ``[CLS, patches, sparse]`` (STELLAR.md section 1).

Images come in [0, 1] and are normalized inside with the ImageNet mean/std. The r learned sparse
tokens (init normal, std D^-0.5) are appended after the position embedding and go through the
same blocks; the final-norm outputs split into ``cls [B,1,D]``, ``dense [B,N,D]``,
``sparse [B,r,D]``.

Masked views pass ``keep`` (LongTensor[B, n_keep], patch indices in row-major order): the patches
are embedded (position embedding included), then only the kept ones are gathered; CLS and the
sparse tokens are always kept. ``dense`` is then the kept patches' outputs, in ``keep`` order.

``forward_groups([(images_1, keep_1), (images_2, None), ...])`` runs several view groups (the
full images, the masked views, the local views) through the blocks in one packed pass
(``Transformer.forward_packed``): one GEMM per weight and layer for all their tokens, attention
per sequence. Images may come in bfloat16 (a loader's 16-bit views): they are normalised in the
patch embedding's dtype (float32), so a bf16 view gives exactly the float32 model's result for the
same rounded pixels.
"""
from __future__ import annotations

import math

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

    def check(self, images: Tensor, keep: Tensor | None = None) -> None:
        """Raise a ValueError naming the argument if ``images``/``keep`` cannot go through ``tokens``.

        The range of ``keep`` is checked on CPU tensors only: on CUDA it would synchronise (the
        gather asserts on the device anyway).
        """
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a Tensor[B, 3, H, W], got {got}")
        if keep is None:
            return
        B = images.shape[0]
        N = math.prod(self.grid(images))
        if not isinstance(keep, Tensor) or keep.dim() != 2 or keep.shape[0] != B or keep.dtype != torch.long:
            got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, Tensor) else type(keep).__name__
            raise ValueError(f"keep must be a LongTensor[B={B}, n_keep], got {got}")
        if keep.device.type == "cpu" and keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= N):
            raise ValueError(f"keep must hold patch indices in [0, {N}), "
                             f"got [{int(keep.min())}, {int(keep.max())}]")

    def tokens(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """The input sequence Tensor[B, 1 + n + r, D] (n = N, or n_keep with ``keep``)."""
        self.check(images, keep)
        return self.embed_group(images, keep)

    def embed_group(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """``tokens`` without the checks (the step's compiled piece: no host reads)."""
        embed = self.__dict__.get("_embed")
        return embed(images, keep) if embed is not None else self._embed_group(images, keep)

    def _embed_group(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        w = self.vit.patch_embed.proj.weight
        x = images.to(torch.promote_types(images.dtype, w.dtype))         # bf16 views: normalise in fp32
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        x = self.vit.embed(x)                                              # B x 1+N x D
        if keep is not None:
            D = x.shape[-1]
            kept = torch.gather(x[:, 1:], 1, keep.unsqueeze(-1).expand(-1, -1, D))   # B x n_keep x D
            x = torch.cat([x[:, :1], kept], dim=1)
        sparse = self.sparse_tokens.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([x, sparse], dim=1)

    def compile_embedding(self, **compile_kwargs) -> None:
        """torch.compile ``embed_group`` in place (one graph per view group's shape)."""
        self._embed = torch.compile(self._embed_group, **compile_kwargs)

    def split(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Tensor[B, 1 + n + r, D] -> (cls [B,1,D], dense [B,n,D], sparse [B,r,D])."""
        r = self.num_tokens
        return out[:, :1], out[:, 1:-r], out[:, -r:]

    def forward(self, images: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """images: Tensor[B, 3, H, W] in [0, 1]; keep: LongTensor[B, n_keep] or None.

        Returns cls Tensor[B, 1, D], dense Tensor[B, n, D] (n = N or n_keep), sparse Tensor[B, r, D].
        """
        return self.split(self.vit.transformer(self.tokens(images, keep)))

    def forward_groups(self, groups) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Several view groups in one packed pass through the blocks.

        groups: a sequence of (images Tensor[B_i, 3, H_i, W_i], keep LongTensor[B_i, n_keep] | None).
        Returns one (cls, dense, sparse) per group, equal to ``forward`` on each to float rounding.
        """
        for images, keep in groups:
            self.check(images, keep)
        seqs = [self.embed_group(images, keep) for images, keep in groups]
        return [self.split(out) for out in self.vit.transformer.forward_packed(seqs)]

"""A plain pre-norm Vision Transformer on ``F.scaled_dot_product_attention``.

Numerically it is the Hugging Face ``ViTModel`` formulation (which is also timm's): tokens
``[CLS, patches]`` plus a learned position embedding, blocks
``x + attn(LN(x))`` then ``x + mlp(LN(x))`` with exact GELU, a final LayerNorm. The one
structural difference is a fused qkv projection (``[q; k; v]`` rows of one Linear), which the
official-checkpoint loader builds by concatenating HF's separate query/key/value weights.

Other input sizes interpolate the position embedding bicubically (``align_corners=False``, to
the target grid size), as HF ``interpolate_pos_encoding`` and timm do.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VIT_PRESETS", "Attention", "Mlp", "Block", "Transformer", "PatchEmbed",
           "VisionTransformer", "vit_preset"]

# dim, depth, heads, patch size, the image size the position embedding is learned at.
VIT_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(dim=128, depth=4, heads=4, patch_size=8, img_size=64),     # CPU runs
    "small": dict(dim=384, depth=12, heads=6, patch_size=16, img_size=224),
    "base": dict(dim=768, depth=12, heads=12, patch_size=16, img_size=224),
    "large": dict(dim=1024, depth=24, heads=16, patch_size=16, img_size=224),
    "huge": dict(dim=1280, depth=32, heads=16, patch_size=14, img_size=224),
}


def vit_preset(arch: str) -> dict[str, int]:
    """The preset of ``arch`` (tiny | small | base | large | huge), a fresh dict."""
    if arch not in VIT_PRESETS:
        raise ValueError(f"arch must be one of {sorted(VIT_PRESETS)}, got {arch!r}")
    return dict(VIT_PRESETS[arch])


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv Linear; scale ``head_dim ** -0.5``.

    forward(x: Tensor[B, T, D]) -> Tensor[B, T, D].
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                      # each B x h x T x hd
        x = F.scaled_dot_product_attention(q, k, v)                  # B x h x T x hd
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """Linear(D -> hidden), exact GELU, Linear(hidden -> D)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, ln_eps: float = 1e-6,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """``depth`` pre-norm blocks and a final LayerNorm: Tensor[B, T, D] -> Tensor[B, T, D]."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, ln_eps: float = 1e-6,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.dim = dim
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, ln_eps, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=ln_eps)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class PatchEmbed(nn.Module):
    """Conv2d(3 -> D, kernel = stride = patch): images Tensor[B, 3, H, W] -> Tensor[B, h*w, D].

    Patches are in row-major order; H and W must be multiples of the patch size.
    """

    def __init__(self, patch_size: int, dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"images of {height}x{width} px are not a multiple of the patch size {p}")
        return height // p, width // p

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != self.proj.in_channels:
            raise ValueError(f"images must be a Tensor[B, {self.proj.in_channels}, H, W], got {tuple(images.shape)}")
        self.grid(images.shape[2], images.shape[3])
        return self.proj(images).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT with CLS token and a learned position embedding (HF ``ViTModel`` semantics).

    ``embed(images[B,3,H,W]) -> Tensor[B, 1+N, D]`` (CLS first, position embedding added,
    interpolated for other grids); ``forward`` runs ``embed`` then the blocks and final norm.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, dim: int = 768, depth: int = 12,
                 heads: int = 12, mlp_ratio: float = 4.0, ln_eps: float = 1e-6,
                 qkv_bias: bool = True, mlp_dim: int | None = None) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size})")
        self.img_size = img_size
        self.patch_size = patch_size
        self.dim = dim
        self.patch_embed = PatchEmbed(patch_size, dim)
        side = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + side * side, dim))
        mlp_dim = int(dim * mlp_ratio) if mlp_dim is None else mlp_dim
        self.transformer = Transformer(dim, depth, heads, mlp_dim, ln_eps, qkv_bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        _init_weights(self.patch_embed.proj)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.blocks

    @property
    def norm(self) -> nn.LayerNorm:
        return self.transformer.norm

    def position_embedding(self, grid_h: int, grid_w: int) -> Tensor:
        """Tensor[1, 1+grid_h*grid_w, D]: the learned table, bicubically resized for other grids."""
        table = self.pos_embed
        n = table.shape[1] - 1
        side = math.isqrt(n)
        if grid_h * grid_w == n and grid_h == grid_w:
            return table
        patch = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)      # 1 x D x s x s
        patch = F.interpolate(patch, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch = patch.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([table[:, :1], patch], dim=1)

    def embed(self, images: Tensor) -> Tensor:
        """images: Tensor[B, 3, H, W] (already normalized) -> tokens Tensor[B, 1+N, D]."""
        grid = self.patch_embed.grid(images.shape[-2], images.shape[-1])
        x = self.patch_embed(images)                                   # B x N x D
        # No casts: under autocast the residual stream is promoted to the parameters' float32,
        # as in HF/timm (the conv output is bf16, CLS and position table float32).
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position_embedding(*grid)

    def forward(self, images: Tensor) -> Tensor:
        return self.transformer(self.embed(images))


def _init_weights(m: nn.Module) -> None:
    """HF/timm ViT init: truncated normal std 0.02 for Linear/Conv weights, zero bias, LN 1/0."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

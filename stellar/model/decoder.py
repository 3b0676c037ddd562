"""The reconstruction decoder: from Z only (STELLAR.md section 3).

    x   = proj(Z) + PE                 [B, N, 512]   proj: Linear(D -> 512), PE: random Fourier
    x   = Transformer(x)               [B, N, 512]   6 pre-norm blocks, no CLS, final LayerNorm
    out = head(x)                      pixels [B, 3, H, W] (ConvTranspose2d, kernel = stride = p)
                                       or code logits [B, N, vocab] (Linear)

Because every row of L sums to 1, ``proj(Z) = L (S W^T) + b = L proj(S)``: the model feeds the
decoder ``L @ proj(S)`` (formed at rank r by the factorization's ``out_proj``), N/r times cheaper
than projecting Z; ``forward`` takes that projected input, ``decode`` takes Z itself.
"""
from __future__ import annotations

from torch import Tensor, nn

from stellar.nn.posenc import RandomFourierPositionEncoding
from stellar.nn.vit import Transformer

__all__ = ["Decoder", "HEADS"]

HEADS = ("pixels", "tokens")


class Decoder(nn.Module):
    """Decoder over Z.

    Args:
        in_dim: D, the encoder width (Z's width).
        patch_size: the encoder's patch size (the pixel head's kernel and stride).
        dim, depth, heads, mlp_dim: the decoder ViT (512, 6, 8, 2048 in the paper).
        head: "pixels" (ConvTranspose2d(dim -> 3)) or "tokens" (Linear(dim -> vocab)).
        vocab: the tokenizer's codebook size (token head).
        ln_eps, qkv_bias: as the encoder's.
    """

    def __init__(self, in_dim: int, patch_size: int, dim: int = 512, depth: int = 6, heads: int = 8,
                 mlp_dim: int = 2048, head: str = "pixels", vocab: int = 1024, ln_eps: float = 1e-6,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.head_kind = head
        self.patch_size = patch_size
        self.proj = nn.Linear(in_dim, dim)
        self.pos = RandomFourierPositionEncoding(dim)
        self.transformer = Transformer(dim, depth, heads, mlp_dim, ln_eps, qkv_bias)
        if head == "pixels":
            self.head = nn.ConvTranspose2d(dim, 3, kernel_size=patch_size, stride=patch_size)
        else:
            self.head = nn.Linear(dim, vocab)

    @staticmethod
    def square_grid(n: int) -> tuple[int, int]:
        side = int(n ** 0.5)
        if side * side != n:
            raise ValueError(f"cannot infer a square grid from {n} patches; pass grid=(h, w)")
        return side, side

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """x: the projected input ``proj(Z)`` Tensor[B, N, dim] -> pixels or logits.

        grid: (h, w) with h * w = N, patches row-major (default: square).
        """
        B, N, C = x.shape
        h, w = self.square_grid(N) if grid is None else grid
        if h * w != N:
            raise ValueError(f"grid {h}x{w} does not hold N={N} patches")
        x = x + self.pos(h, w)                                             # float32 PE: promotes
        x = self.transformer(x)                                            # B x N x dim
        if self.head_kind == "tokens":
            return self.head(x)                                            # B x N x vocab
        return self.head(x.transpose(1, 2).reshape(B, C, h, w))            # B x 3 x hp x wp

    def decode(self, Z: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """Z: Tensor[B, N, D] -> pixels Tensor[B, 3, H, W] or logits Tensor[B, N, vocab]."""
        if Z.dim() != 3 or Z.shape[-1] != self.proj.in_features:
            raise ValueError(f"Z must be a Tensor[B, N, {self.proj.in_features}], got {tuple(Z.shape)}")
        return self.forward(self.proj(Z), grid)

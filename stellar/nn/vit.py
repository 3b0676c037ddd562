"""A plain pre-norm Vision Transformer on ``F.scaled_dot_product_attention``.

Numerically it is the Hugging Face ``ViTModel`` formulation (which is also timm's): tokens
``[CLS, patches]`` plus a learned position embedding, blocks
``x + attn(LN(x))`` then ``x + mlp(LN(x))`` with exact GELU, a final LayerNorm. The one
structural difference is a fused qkv projection (``[q; k; v]`` rows of one Linear), which the
official-checkpoint loader builds by concatenating HF's separate query/key/value weights.

Packed groups (DINOv3's trick for multi-crop training): ``Transformer.forward_packed([x_1, ...])``
runs several groups of sequences ``x_i: Tensor[B_i, T_i, D]`` (e.g. the full images, the masked
views and the local views) through the blocks in one pass: their tokens are concatenated into one
``[sum B_i T_i, D]`` matrix for the LayerNorms, the qkv and output projections and the MLP (one
GEMM per weight and layer instead of one per group), and only attention runs per sequence:
    sdpa      one ``F.scaled_dot_product_attention`` call per group (sequences of a group share T)
    varlen    one ``torch.nn.attention.varlen.varlen_attn`` call over all sequences (CUDA, 16-bit)
    xformers  one ``memory_efficient_attention`` call with a block-diagonal mask (where it loads)
    auto      sdpa: on an H200 it beat one varlen call (2.69 vs 4.37 ms per ViT-B layer, fwd+bwd,
              PERF.md), and xformers 0.0.35's ops do not load on torch 2.11.
Each output row equals the unpacked ``forward`` to float rounding (the same sums, other GEMM tiles).

``residual_bf16``: under autocast the residual stream is promoted to float32 by the float32
position table (HF/timm behaviour); with this flag the stream is cast to the autocast dtype at the
entry, so every residual add and every LayerNorm input stays 16-bit (LayerNorm still computes in
float32 under autocast, and the final norm returns float32). Without autocast it does nothing.

Other input sizes interpolate the position embedding bicubically (``align_corners=False``, to
the target grid size), as HF ``interpolate_pos_encoding`` and timm do.
"""
from __future__ import annotations

import functools
import importlib
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VIT_PRESETS", "ATTENTION_BACKENDS", "Attention", "Mlp", "Block", "Transformer", "PatchEmbed",
           "VisionTransformer", "vit_preset", "xformers_status", "resolve_attention", "attention_info"]

# How packed groups run their attention (see the module docstring); "auto" resolves to "sdpa".
ATTENTION_BACKENDS = ("auto", "sdpa", "varlen", "xformers")
# A group of packed sequences: (number of sequences, tokens per sequence).
Groups = tuple[tuple[int, int], ...]

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

    forward(x: Tensor[B, T, D]) -> Tensor[B, T, D]; forward_packed(x: Tensor[sum B_i T_i, D],
    groups) -> the same rows, attention within each sequence only. ``backend`` (one of
    ATTENTION_BACKENDS) picks how packed attention runs.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = "sdpa"

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                      # each B x h x T x hd
        x = F.scaled_dot_product_attention(q, k, v)                  # B x h x T x hd
        return self.proj(x.transpose(1, 2).reshape(B, T, D))

    def forward_packed(self, x: Tensor, groups: Groups) -> Tensor:
        """x: Tensor[sum_i B_i*T_i, D], the sequences of each group back to back; groups: ((B_i, T_i), ...)."""
        D = x.shape[-1]
        qkv = self.qkv(x)                                            # one GEMM for all groups
        backend = _packed_backend(self.backend, qkv)
        if backend == "varlen":
            out = _varlen_attention(qkv, groups, self.heads, self.head_dim)
        elif backend == "xformers":
            out = _xformers_attention(qkv, groups, self.heads, self.head_dim)
        else:
            outs = []
            for (B, T), chunk in zip(groups, qkv.split([B * T for B, T in groups])):
                q, k, v = chunk.view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
                o = F.scaled_dot_product_attention(q, k, v)          # B x h x T x hd
                outs.append(o.transpose(1, 2).reshape(B * T, D))
            out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return self.proj(out)                                        # one GEMM for all groups


def resolve_attention(backend: str) -> str:
    """The packed-attention backend that ``backend`` (ATTENTION_BACKENDS) stands for: auto -> sdpa."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    return "sdpa" if backend == "auto" else backend


_fallback_warned: set[str] = set()


def attention_info() -> dict:
    """What each ``model.attention`` choice runs here (for ``stellar info``)."""
    xf = xformers_status()
    return {
        "auto": "sdpa: one scaled_dot_product_attention per view group (faster than one varlen call "
                "on an H200: 2.69 vs 4.37 ms per ViT-B layer, fwd+bwd)",
        "varlen": ("torch.nn.attention.varlen.varlen_attn (CUDA, fp16/bf16)" if _varlen_fn() is not None
                   else "not in this torch"),
        "xformers": ("loads: " if xf["loads"] else "does not load: ") + xf["reason"],
    }


def _packed_backend(backend: str, qkv: Tensor) -> str:
    """``backend`` if it can run on ``qkv``, else "sdpa" with a warning (once per reason) saying why."""
    if backend in ("sdpa", "auto"):
        return "sdpa"
    why = None
    if qkv.device.type != "cuda":
        why = f"it needs CUDA tensors, got {qkv.device.type}"
    elif qkv.dtype not in (torch.float16, torch.bfloat16):
        why = f"it needs float16/bfloat16 (autocast), got {qkv.dtype}"
    elif backend == "varlen" and _varlen_fn() is None:
        why = "torch.nn.attention.varlen.varlen_attn is missing from this torch"
    elif backend == "xformers" and not xformers_status()["loads"]:
        why = xformers_status()["reason"]
    if why is None:
        return backend
    if why not in _fallback_warned:
        _fallback_warned.add(why)
        warnings.warn(f"attention={backend!r} cannot run here ({why}); packed attention uses one "
                      "scaled_dot_product_attention call per group instead", stacklevel=3)
    return "sdpa"


@functools.lru_cache(maxsize=None)
def _varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _cu_seqlens(groups: Groups, device: torch.device) -> Tensor:
    """int32 [S+1] cumulative sequence starts of all packed sequences, built on the device (no copy
    from the host, so no synchronisation)."""
    starts, offset = [], 0
    for B, T in groups:
        starts.append(torch.arange(B, device=device, dtype=torch.int32) * T + offset)
        offset += B * T
    starts.append(torch.full((1,), offset, device=device, dtype=torch.int32))
    return torch.cat(starts)


def _varlen_attention(qkv: Tensor, groups: Groups, heads: int, head_dim: int) -> Tensor:
    q, k, v = qkv.view(-1, 3, heads, head_dim).unbind(1)            # each T_total x h x hd
    cu = _cu_seqlens(groups, qkv.device)
    longest = max(T for _, T in groups)
    # Positional arguments only: the keywords changed between torch 2.10 and 2.14.
    out = _varlen_fn()(q, k, v, cu, cu, longest, longest)
    return out.reshape(qkv.shape[0], heads * head_dim)


_xformers_masks: dict = {}


def _xformers_attention(qkv: Tensor, groups: Groups, heads: int, head_dim: int) -> Tensor:
    from xformers.ops import fmha

    mask = _xformers_masks.get((groups, qkv.device))
    if mask is None:        # built once per shape (its seqlen tensors would be a host copy per call)
        seqlens = [T for B, T in groups for _ in range(B)]
        mask = _xformers_masks[(groups, qkv.device)] = fmha.BlockDiagonalMask.from_seqlens(seqlens, device=qkv.device)
    q, k, v = qkv.view(1, -1, 3, heads, head_dim).unbind(2)         # each 1 x T_total x h x hd
    out = fmha.memory_efficient_attention(q, k, v, attn_bias=mask)
    return out.reshape(qkv.shape[0], heads * head_dim)


@functools.lru_cache(maxsize=None)
def xformers_status() -> dict:
    """{"loads": bool, "version": str | None, "reason": str}: whether xformers' compiled attention
    ops load in this process, and why not (missing package, or a wheel built for another torch)."""
    try:
        xformers = importlib.import_module("xformers")
    except Exception as exc:
        return {"loads": False, "version": None, "reason": f"xformers is not importable ({type(exc).__name__}: {exc})"}
    version = getattr(xformers, "__version__", "unknown")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cpp = importlib.import_module("xformers._cpp_lib")
            importlib.import_module("xformers.ops")
    except Exception as exc:
        return {"loads": False, "version": version, "reason": f"xformers.ops does not import ({type(exc).__name__}: {exc})"}
    failure = getattr(cpp, "_cpp_library_load_exception", None)
    if failure is not None:
        built = getattr(getattr(cpp, "_build_metadata", None), "torch_version", None)
        detail = f" (built for torch {built}, running {torch.__version__})" if built else ""
        return {"loads": False, "version": version,
                "reason": f"xformers {version}'s compiled ops do not load{detail}: {str(failure).splitlines()[0]}"}
    return {"loads": True, "version": version, "reason": f"xformers {version}: compiled ops loaded"}


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

    def forward(self, x: Tensor, groups: Groups | None = None) -> Tensor:
        """x: Tensor[B, T, D]; or packed groups, x: Tensor[sum B_i T_i, D] with groups ((B_i, T_i), ...)."""
        if groups is None:
            x = x + self.attn(self.norm1(x))
        else:
            x = x + self.attn.forward_packed(self.norm1(x), groups)
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
        self.residual_bf16 = False
        self.apply(_init_weights)

    @property
    def attention(self) -> str:
        return self.blocks[0].attn.backend

    @attention.setter
    def attention(self, backend: str) -> None:
        """How packed groups run attention: one of ATTENTION_BACKENDS (auto -> sdpa)."""
        backend = resolve_attention(backend)
        for block in self.blocks:
            block.attn.backend = backend

    def _residual(self, x: Tensor) -> Tensor:
        if self.residual_bf16 and torch.is_autocast_enabled(x.device.type):
            return x.to(torch.get_autocast_dtype(x.device.type))
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self._residual(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_packed(self, xs: list[Tensor] | tuple[Tensor, ...]) -> list[Tensor]:
        """Several groups in one pass: xs[i]: Tensor[B_i, T_i, D] -> outputs of the same shapes.

        Equal to ``[self(x) for x in xs]`` to float rounding; the LayerNorms, projections and MLPs
        run once on all tokens, attention per sequence (``attention`` picks how).
        """
        if not xs:
            raise ValueError("forward_packed needs at least one group")
        for i, x in enumerate(xs):
            if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
                got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"xs[{i}] must be a Tensor[B, T, {self.dim}], got {got}")
        groups = tuple((int(x.shape[0]), int(x.shape[1])) for x in xs)
        x = torch.cat([x.reshape(-1, self.dim) for x in xs]) if len(xs) > 1 else xs[0].reshape(-1, self.dim)
        x = self._residual(x)
        for block in self.blocks:
            x = block(x, groups)
        x = self.norm(x)
        return [part.view(B, T, self.dim) for (B, T), part in zip(groups, x.split([B * T for B, T in groups]))]


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

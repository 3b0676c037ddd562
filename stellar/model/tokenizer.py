"""The MaskGIT-VQGAN tokenizer's encoder: images -> code ids for the VQ-token head.

STELLAR.md section 3. Architecture of the released ``maskgit-vqgan-imagenet-f16-256``:
"same"-padded convolutions (all stride 1 with odd kernels, so a symmetric ``k // 2`` pad);
``conv_in`` 3x3 (3 -> 128, no bias); 5 levels with channel multipliers (1, 1, 2, 2, 4) x 128,
each 2 residual blocks (GroupNorm(32, eps 1e-6) -> SiLU -> 3x3 conv, twice, no conv bias)
and a 2x2 average pool after every level but the last; 2 middle residual blocks at 512;
GroupNorm -> SiLU -> 1x1 conv (with bias) to 256; each cell's code is the nearest of 1024
codebook vectors (dimension 256) in Euclidean distance.

The quirk, kept on purpose: when a residual block changes the width, the released model's
shortcut is a 1x1 conv (out -> out, no bias) of the block's *output* h, so the block returns
``h + W h``, not ``h + W x``. The weights were trained that way.

Parameter names follow the released PyTorch weights (the open-muse / TiTok layout):
``encoder.conv_in.weight``, ``encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,
nin_shortcut}.*``, ``encoder.mid.{j}.*``, ``encoder.norm_out.*``, ``encoder.conv_out.*``,
``quantize.embedding.weight``; a file's ``decoder.*`` keys are accepted and ignored.

Input scaling: images in [0, 1], unnormalized. The released weights are converted from
MaskGIT's JAX tokenizer, which takes [0, 1] images, and the released PyTorch usage feeds the
output of ``torchvision.transforms.ToTensor()`` straight in; no mean/std and no [-1, 1]
mapping.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stellar.model.weights import read_state_dict

__all__ = ["VQGANResidualBlock", "VQGANEncoder", "VQGANTokenizer", "nearest_code"]


def _conv(cin: int, cout: int, kernel: int, bias: bool) -> nn.Conv2d:
    """A stride-1 conv with "same" padding (odd kernel: symmetric k // 2 on every side)."""
    return nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class VQGANResidualBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus a shortcut.

    x: Tensor[B, in_ch, H, W] -> Tensor[B, out_ch, H, W]. Same width: ``h + x``. Width change:
    ``h + nin_shortcut(h)`` with ``nin_shortcut`` a 1x1 conv out_ch -> out_ch of the block's
    output (the released model's quirk, see the module docstring).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = _conv(in_channels, out_channels, 3, bias=False)
        self.norm2 = _norm(out_channels)
        self.conv2 = _conv(out_channels, out_channels, 3, bias=False)
        if in_channels != out_channels:
            self.nin_shortcut = _conv(out_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.in_channels != self.out_channels:
            return h + self.nin_shortcut(h)   # residual of the OUTPUT, as released
        return h + x


class _Level(nn.Module):
    """One resolution level: ``block`` (residual blocks), then a 2x2 average pool unless last."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(VQGANResidualBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.block:
            x = blk(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2) if self.downsample else x


class VQGANEncoder(nn.Module):
    """images Tensor[B, 3, H, W] in [0, 1] -> features Tensor[B, z_channels, H / f, W / f],
    f = 2 ** (len(channel_mult) - 1) (16 for the released model)."""

    def __init__(self, hidden_channels: int = 128, channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 256, in_channels: int = 3) -> None:
        super().__init__()
        if hidden_channels % 32:
            raise ValueError(f"hidden_channels must be a multiple of 32 (GroupNorm(32)), "
                             f"got {hidden_channels}")
        mult = tuple(int(m) for m in channel_mult)
        if not mult or min(mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty sequence of positive ints, "
                             f"got {channel_mult}")
        self.downsample_factor = 2 ** (len(mult) - 1)
        self.conv_in = _conv(in_channels, hidden_channels, 3, bias=False)
        ins = (1,) + mult[:-1]
        self.down = nn.ModuleList(
            _Level(hidden_channels * a, hidden_channels * b, num_res_blocks, downsample=i < len(mult) - 1)
            for i, (a, b) in enumerate(zip(ins, mult)))
        mid = hidden_channels * mult[-1]
        self.mid = nn.ModuleList(VQGANResidualBlock(mid, mid) for _ in range(num_res_blocks))
        self.norm_out = _norm(mid)
        self.conv_out = _conv(mid, z_channels, 1, bias=True)

    def forward(self, images: Tensor) -> Tensor:
        x = self.conv_in(images)
        for level in self.down:
            x = level(x)
        for blk in self.mid:
            x = blk(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class _Codebook(nn.Module):
    """Holds ``embedding`` (num_codes x dim), named as the released ``quantize`` module."""

    def __init__(self, num_codes: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_codes, dim)


def nearest_code(features: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook vector (Euclidean) per cell.

    features: Tensor[B, C, h, w], codebook: Tensor[V, C] -> LongTensor[B, h, w].
    Uses ||z||^2 + ||e||^2 - 2 z.e (the ||z||^2 term does not change the argmin but keeps
    the distances true for ties in float arithmetic).
    """
    B, C, h, w = features.shape
    z = features.permute(0, 2, 3, 1).reshape(-1, C)                                  # (B h w) x C
    d = z.square().sum(1, keepdim=True) + codebook.square().sum(1) - 2 * z @ codebook.t()  # (B h w) x V
    return d.argmin(dim=1).view(B, h, w)


class VQGANTokenizer(nn.Module):
    """Frozen MaskGIT-VQGAN encoder + codebook: ``forward(images) -> codes``.

    images: Tensor[B, 3, H, W] in [0, 1]; returns LongTensor[B, H / f, W / f] of code ids in
    [0, codebook_size), f = 16 for the released configuration (the defaults). With
    ``resize_to`` set, inputs of another size are first resized bicubically (align_corners
    False, clamped to [0, 1]) to ``resize_to`` x ``resize_to`` (256 for ViT/14 models, whose
    224 px input STELLAR.md resizes to 256). Otherwise H and W must be multiples of f.

    Runs without gradient, in float32 with autocast off (a cast would move codes), and
    stays in eval mode with ``requires_grad=False`` on every parameter. Build with random
    weights (tests) or :meth:`from_file` (released weights, local file only).
    """

    def __init__(self, hidden_channels: int = 128, channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 256, codebook_size: int = 1024,
                 resize_to: int | None = None) -> None:
        super().__init__()
        self.encoder = VQGANEncoder(hidden_channels, channel_mult, num_res_blocks, z_channels)
        self.quantize = _Codebook(codebook_size, z_channels)
        self.codebook_size = codebook_size
        self.resize_to = resize_to
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VQGANTokenizer":
        """Always stays in eval mode: the tokenizer is frozen."""
        return super().train(False)

    @property
    def downsample_factor(self) -> int:
        return self.encoder.downsample_factor

    def _prepare(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a Tensor[B, 3, H, W] in [0, 1], got {got}")
        x = images.to(self.quantize.embedding.weight.dtype)
        if self.resize_to is not None and tuple(x.shape[-2:]) != (self.resize_to, self.resize_to):
            x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bicubic",
                              align_corners=False).clamp_(0.0, 1.0)
        f = self.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"images height and width must be multiples of {f} (or set resize_to), "
                             f"got {tuple(x.shape[-2:])}")
        return x

    @torch.no_grad()
    def encode_features(self, images: Tensor) -> Tensor:
        """images Tensor[B, 3, H, W] in [0, 1] -> pre-quantization features Tensor[B, 256, H/f, W/f]."""
        x = self._prepare(images)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.encoder(x)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """images Tensor[B, 3, H, W] in [0, 1] -> codes LongTensor[B, H/f, W/f]."""
        z = self.encode_features(images)
        with torch.autocast(device_type=z.device.type, enabled=False):
            return nearest_code(z, self.quantize.embedding.weight)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor],
                        resize_to: int | None = None) -> "VQGANTokenizer":
        """Build from a state dict in the released layout, inferring widths, depth and codebook
        from the tensor shapes. ``decoder.*`` keys are ignored; any other unknown or missing key
        raises a ValueError that lists them."""
        sd = {k: v for k, v in state_dict.items() if not k.startswith("decoder.")}
        try:
            hidden = sd["encoder.conv_in.weight"].shape[0]
            codes, z_ch = sd["quantize.embedding.weight"].shape
        except KeyError as e:
            raise ValueError(f"state_dict is not a MaskGIT-VQGAN checkpoint: "
                             f"missing {e.args[0]!r}") from None
        mult, i = [], 0
        while f"encoder.down.{i}.block.0.conv1.weight" in sd:
            mult.append(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // hidden)
            i += 1
        blocks = 0
        while f"encoder.down.0.block.{blocks}.conv1.weight" in sd:
            blocks += 1
        if not mult or not blocks:
            raise ValueError("state_dict has no encoder.down.{i}.block.{j} weights")
        model = cls(hidden, tuple(mult), blocks, z_ch, codes, resize_to=resize_to)
        own = model.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if missing or unexpected:
            raise ValueError(f"state_dict does not match the MaskGIT-VQGAN encoder: "
                             f"missing keys {missing}, unexpected keys {unexpected}")
        bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
        if bad:
            raise ValueError("state_dict shapes do not match: " + ", ".join(
                f"{k} {tuple(sd[k].shape)} (expected {tuple(own[k].shape)})" for k in bad))
        model.load_state_dict({k: v.float() for k, v in sd.items()})
        return model

    @classmethod
    def from_file(cls, path: str | os.PathLike, resize_to: int | None = None) -> "VQGANTokenizer":
        """Load released weights from a local ``.safetensors`` file or a torch file (``.bin``,
        ``.pt``, ``.pth``, read with ``weights_only=True``). Never touches the network."""
        sd = read_state_dict(path, "path")
        return cls.from_state_dict(sd, resize_to=resize_to)

    def extra_repr(self) -> str:
        return (f"codebook_size={self.codebook_size}, downsample={self.downsample_factor}, "
                f"resize_to={self.resize_to}")

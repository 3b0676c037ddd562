"""Reconstruction losses from Z (STELLAR.md section 3): pixels (MSE) or VQ tokens (cross-entropy)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from stellar.losses._dtype import upcast

__all__ = ["pixel_loss", "token_loss"]


def pixel_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between the reconstruction and the [0, 1] input image.

    pred: Tensor[B, 3, H, W] (the pixel head's output), target: Tensor[B, 3, H, W] in [0, 1]
    (not normalized). Returns a float32 scalar (float64 for float64 inputs), computed with
    autocast off.
    """
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor) or pred.shape != target.shape:
        ps = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
        ts = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"pred and target must have the same shape, got pred {ps} and target {ts}")
    with torch.autocast(device_type=pred.device.type, enabled=False):
        pred = upcast(pred)
        return F.mse_loss(pred, target.detach().to(pred.dtype))


def token_loss(logits: Tensor, codes: Tensor) -> Tensor:
    """Cross-entropy of the token head's logits against the tokenizer's code ids.

    logits: Tensor[B, N, V], codes: LongTensor[B, N] (or [B, h, w] with h * w = N, as the
    tokenizer returns them) with values in [0, V). Mean over the B * N positions; float32
    scalar (float64 for float64 logits), autocast off.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a Tensor[B, N, V], got {got}")
    if not isinstance(codes, Tensor) or codes.dtype not in (torch.int64, torch.int32):
        got = codes.dtype if isinstance(codes, Tensor) else type(codes).__name__
        raise ValueError(f"codes must be an integer Tensor[B, N], got {got}")
    B, N, V = logits.shape
    codes = codes.reshape(codes.shape[0], -1) if codes.dim() == 3 else codes
    if tuple(codes.shape) != (B, N):
        raise ValueError(f"codes must be a Tensor[B, N] = [{B}, {N}] matching logits, "
                         f"got {tuple(codes.shape)}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.cross_entropy(upcast(logits).reshape(B * N, V), codes.reshape(B * N).long())

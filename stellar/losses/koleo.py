"""KoLeo regulariser on each image's sparse tokens (STELLAR.md section 5), fp32, autocast off."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from stellar.losses._dtype import upcast

__all__ = ["koleo_loss"]


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """``-mean log(0.5 * ||x_i - x_nn(i)|| + eps)`` over all tokens of all images.

    x: Tensor[B, r, D], r >= 2. Tokens are L2-normalized; each token's nearest neighbour is
    the other token of the same image with the largest dot product (itself excluded).
    Returns a float32 scalar (float64 for float64 x); gradients flow through both the token
    and its neighbour.
    """
    if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
        got = (tuple(x.shape), x.dtype) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating Tensor[B, r, D], got {got}")
    if x.shape[1] < 2:
        raise ValueError(f"x must hold r >= 2 tokens per image for a nearest neighbour, "
                         f"got r={x.shape[1]}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(upcast(x), dim=-1, eps=eps)                     # B x r x D
        with torch.no_grad():
            dots = x @ x.transpose(1, 2)                                # B x r x r
            dots.diagonal(dim1=1, dim2=2).fill_(-float("inf"))          # exclude self
            nn_idx = dots.argmax(dim=2)                                 # B x r
        neighbour = torch.gather(x, 1, nn_idx.unsqueeze(-1).expand_as(x))  # B x r x D
        dist = torch.linalg.vector_norm(x - neighbour, dim=-1)         # B x r
        return -torch.log(0.5 * dist + eps).mean()


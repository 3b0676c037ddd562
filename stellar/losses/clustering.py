"""Online clustering targets (Sinkhorn-Knopp) and the soft-target cross-entropy.

STELLAR.md section 4: targets are Sinkhorn-Knopp on ``logits / 0.06`` over all rows of the
batch (and over ranks when distributed), exp with a max-shift, 3 iterations of (divide by
column sums, divide by row sums), eps 1e-8; the loss is the soft-target cross-entropy
``-sum_c t_c log softmax(logits / 0.12)_c``, mean over rows. Both run in fp32 with autocast
off.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from stellar.losses._dtype import upcast

__all__ = ["sinkhorn_knopp", "soft_cross_entropy"]


def _check_2d(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a Tensor[M, C], got {shape}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temperature: float = 0.06, iterations: int = 3,
                   eps: float = 1e-8) -> Tensor:
    """Balanced soft assignments of rows to prototypes, exactly as the public implementation.

    logits: Tensor[M, C] (M rows of this rank, C prototypes). Returns targets: Tensor[M, C]
    in float32 (float64 for float64 logits), each row summing to 1 (the last step is the row
    normalisation), columns approximately balanced (each about M_total / C). No gradient.

    The formula (STELLAR.md section 4), with S = logits / temperature:

        shift_c = max over all rows (of all ranks) of S[:, c]               1 x C
        Q       = exp(S - shift + 50)          (+ 0 instead of + 50 for float16 logits)
        repeat `iterations` times:
            Q /= (column sums over all rows of all ranks + eps)             1 x C
            Q /= (row sums + eps)                                           M x 1

    The shift is per column: a per-column factor cancels exactly in the first column
    normalisation, and after it every column sum is at least e^50, so eps never matters. (A
    single global shift does not cancel: a prototype whose best score lies more than
    ln(1 / eps) ~ 18.4 below the global maximum would get a column sum below eps and stay
    nearly unnormalised -- at the head's real scale, most prototypes.)

    With ``torch.distributed`` initialized the column maxima (MAX) and the column sums (SUM)
    are all-reduced, so the M rows of all ranks are balanced together.
    """
    _check_2d("logits", logits)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    distributed = _distributed()
    offset = 0.0 if logits.dtype == torch.float16 else 50.0
    with torch.autocast(device_type=logits.device.type, enabled=False):
        scores = upcast(logits) / temperature                         # M x C
        shift = scores.amax(dim=0, keepdim=True)                       # 1 x C: per-column max
        if distributed:
            dist.all_reduce(shift, op=dist.ReduceOp.MAX)               # ... over all ranks' rows
        Q = torch.exp(scores - shift + offset)                         # M x C, column max e^offset
        for _ in range(iterations):
            col = Q.sum(dim=0, keepdim=True)                           # 1 x C, over all rows
            if distributed:
                dist.all_reduce(col)                                   # ... of all ranks
            Q = Q / (col + eps)
            Q = Q / (Q.sum(dim=1, keepdim=True) + eps)                 # M x 1: each row sums to 1
    return Q


def soft_cross_entropy(logits: Tensor, targets: Tensor, temperature: float = 0.12) -> Tensor:
    """Soft-target cross-entropy ``-sum_c t_c log softmax(logits / temperature)_c``, mean over rows.

    logits: Tensor[M, C] (or [..., C]; leading dims are flattened into rows),
    targets: Tensor[M, C] of the same shape (no gradient flows into them). Returns a
    float32 scalar (float64 for float64 logits).
    """
    if not isinstance(logits, Tensor) or logits.dim() < 1:
        raise ValueError("logits must be a Tensor[M, C]")
    if not isinstance(targets, Tensor) or targets.shape != logits.shape:
        got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"targets must have the shape of logits {tuple(logits.shape)}, got {got}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.numel() == 0:
        raise ValueError("logits must not be empty")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logp = F.log_softmax(upcast(logits).flatten(0, -2) / temperature, dim=-1)  # M x C
        t = targets.detach().to(logp.dtype).flatten(0, -2)                                 # M x C
        return -(t * logp).sum(dim=-1).mean()


"""Plain PyTorch twin of the fused factorization kernels (the oracle the Triton path is tested against).

    q = normalize(dense)        [B, N, D]   row-wise L2, eps
    k = normalize(sparse_q)     [B, r, D]
    L = softmax_r(q k^T / T)    [B, N, r]   the localization matrix
    Z = L @ sparse_v            [B, N, Dv]  each patch a convex mix of the r concept values
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def factorize(
    dense: Tensor, sparse_q: Tensor, sparse_v: Tensor, temperature: float = 0.06, eps: float = 1e-7
) -> tuple[Tensor, Tensor]:
    """Reference factorization.

    Args:
        dense: Tensor[B, N, D], the projected patch features (not yet normalized).
        sparse_q: Tensor[B, r, D], the projected sparse tokens (keys, not yet normalized).
        sparse_v: Tensor[B, r, Dv], the values mixed into Z (STELLAR uses the raw tokens S).
        temperature: softmax temperature tau_s.
        eps: the L2 normalization's floor on the norm (as `F.normalize`).

    Returns:
        Z: Tensor[B, N, Dv] and L: Tensor[B, N, r], both in the inputs' dtype.
    """
    q = F.normalize(dense, dim=-1, eps=eps)
    k = F.normalize(sparse_q, dim=-1, eps=eps)
    logits = torch.matmul(q, k.transpose(-1, -2)) / temperature
    # fp16/bf16 logits are soft-maxed in fp32 (as the kernels accumulate); fp32/fp64 stay as they are,
    # so the float64 reference keeps float64 precision.
    acc = torch.promote_types(logits.dtype, torch.float32)
    L = torch.softmax(logits.to(acc), dim=-1).to(dense.dtype)
    Z = torch.matmul(L, sparse_v)
    return Z, L


# ----------------------------------------------------------------------------- prototype cross-entropy


def prototype_cross_entropy(
    features: Tensor,
    prototypes: Tensor,
    targets: Tensor,
    temperature: float = 0.12,
    target_index: Tensor | None = None,
) -> Tensor:
    """Reference prototype cross-entropy (the plain twin of `stellar.kernels.prototype_cross_entropy`).

        logits = features @ prototypes^T / temperature              [M, C]
        loss   = mean_m  -sum_c targets[idx(m), c] * log_softmax(logits[m])_c

    Builds the [M, C] logits, their log-softmax and the gathered targets in memory: this is the
    formula, not a fast path. 16-bit inputs are computed in float32 (as the kernels accumulate),
    with autocast off; float32 and float64 stay as they are, so the float64 reference keeps
    float64 precision.

    Args:
        features: Tensor[M, K] (already normalised; not normalised here).
        prototypes: Tensor[C, K].
        targets: Tensor[T, C], soft targets; no gradient flows into them.
        temperature: the softmax temperature (> 0).
        target_index: integer Tensor[M] with values in [0, T): row m uses targets[target_index[m]];
            None: T == M and row m uses targets[m].

    Returns:
        The loss, a float32 scalar (float64 for float64 features).
    """
    acc = torch.promote_types(features.dtype, torch.float32)
    with torch.autocast(features.device.type, enabled=False):  # products of the given values, in acc
        logits = torch.matmul(features.to(acc), prototypes.to(acc).t()) / temperature
        t = targets.detach().to(acc)
        if target_index is not None:
            t = t[target_index]
        return -(t * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()

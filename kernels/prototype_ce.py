"""The prototype cross-entropy: `prototype_cross_entropy` dispatches to fused Triton kernels or
to the reference.

    loss = mean_m  -sum_c targets[idx(m), c] * log_softmax(features[m] @ prototypes^T / T)_c

STELLAR's clustering losses (and DINO/iBOT/SwAV-style self-distillation) in one op that never
holds the [M, C] logits: features [M, K] are the clustering head's normalised bottleneck
outputs, prototypes [C, K] its last Linear's weight, targets [T, C] the Sinkhorn-Knopp (or
teacher) assignments, and target_index picks each row's target row inside the kernel, so a
view's rows need no repeated or gathered copy of the targets.

Tier 3 of the kernel stack (tiers 1 and 2 are in `prototype_ce_triton.py`, imported on first
use so that `import stellar.kernels` needs no Triton): two `torch.library` custom ops,
`stellar::prototype_ce_fwd` and `stellar::prototype_ce_bwd`, each with a fake (meta)
implementation, and autograd that calls the backward op; `torch.compile(fullgraph=True)`
traces through them without a graph break.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._dispatch import TRITON_DTYPES, resolve_backend
from .reference import prototype_cross_entropy as prototype_cross_entropy_reference

INDEX_DTYPES = (torch.int64, torch.int32)

# ----------------------------------------------------------------------------- the custom ops


def _on_one_device(**named: Tensor | None) -> None:
    """Every tensor given (None skipped) on one device, else a ValueError naming where each is:
    the public function's check and the ops' own (called directly, a CPU tensor would otherwise
    reach a GPU kernel as a pointer Triton cannot read)."""
    devices = {name: t.device for name, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError("device mismatch: " + ", ".join(f"{n} on {d}" for n, d in devices.items()))


@torch.library.custom_op("stellar::prototype_ce_fwd", mutates_args=())
def _prototype_ce_fwd(
    features: Tensor, prototypes: Tensor, targets: Tensor, target_index: Tensor | None, temperature: float
) -> tuple[Tensor, Tensor]:
    """(loss fp32 [], stats fp32 [3, M]: per row the log-sum-exp in two parts and the target sum)."""
    from .prototype_ce_triton import prototype_ce_forward

    _on_one_device(features=features, prototypes=prototypes, targets=targets, target_index=target_index)

    return prototype_ce_forward(features, prototypes, targets, target_index, temperature)


@_prototype_ce_fwd.register_fake
def _(features, prototypes, targets, target_index, temperature):
    M = features.shape[0]
    f32 = torch.float32
    return features.new_empty((), dtype=f32), features.new_empty(3, M, dtype=f32)


@torch.library.custom_op("stellar::prototype_ce_bwd", mutates_args=())
def _prototype_ce_bwd(
    grad: Tensor, features: Tensor, prototypes: Tensor, targets: Tensor, target_index: Tensor | None,
    stats: Tensor, temperature: float, need_features: bool, need_prototypes: bool,
) -> tuple[Tensor, Tensor]:
    """(d_features [M, K] or [0], d_prototypes [C, K] or [0]): only the gradients asked for run."""
    from .prototype_ce_triton import prototype_ce_backward

    _on_one_device(features=features, grad=grad, prototypes=prototypes, targets=targets,
                   target_index=target_index, stats=stats)

    return prototype_ce_backward(grad, features, prototypes, targets, target_index, stats, temperature,
                                 need_features, need_prototypes)


@_prototype_ce_bwd.register_fake
def _(grad, features, prototypes, targets, target_index, stats, temperature, need_features, need_prototypes):
    return (torch.empty_like(features) if need_features else features.new_empty(0),
            torch.empty_like(prototypes) if need_prototypes else prototypes.new_empty(0))


def _setup_context(ctx, inputs, output):
    features, prototypes, targets, target_index, temperature = inputs
    _, stats = output
    ctx.save_for_backward(features, prototypes, targets, target_index, stats)
    ctx.temperature = temperature


def _backward(ctx, d_loss, d_stats):
    # stats is saved state, not an output the caller differentiates.
    features, prototypes, targets, target_index, stats = ctx.saved_tensors
    need_features, need_prototypes = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if d_loss is None or not (need_features or need_prototypes):
        return None, None, None, None, None
    d_features, d_prototypes = _prototype_ce_bwd(
        d_loss, features, prototypes, targets, target_index, stats, ctx.temperature,
        need_features, need_prototypes,
    )
    return (d_features if need_features else None), (d_prototypes if need_prototypes else None), None, None, None


_prototype_ce_fwd.register_autograd(_backward, setup_context=_setup_context)

# ----------------------------------------------------------------------------- the public function


def prototype_cross_entropy(
    features: Tensor,
    prototypes: Tensor,
    targets: Tensor,
    temperature: float = 0.12,
    target_index: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Soft-target cross-entropy of the prototype logits, without the [M, C] logits in memory.

        loss = mean over m of  -sum_c targets[idx(m), c] * log_softmax(features[m] @ prototypes^T / temperature)_c

    with idx(m) = target_index[m] (or m without an index). Equals
    `soft_cross_entropy(features @ prototypes.T, targets[target_index], temperature)`.

    Args:
        features: Tensor[M, K], the head's normalised bottleneck outputs (not normalised here).
            Its dtype is the compute dtype (under `torch.autocast`, the autocast dtype, as the
            prototype Linear would use); `prototypes` is cast to it.
        prototypes: Tensor[C, K], the prototype Linear's weight. Gradients reach it through
            the cast in its own dtype.
        targets: Tensor[T, C], soft targets (any float dtype; read as fp32 by the kernels; fp32
            targets cost 4 bytes per (row, prototype) read in each of the three kernels, bf16
            half of that). No gradient flows into them. Rows need not sum to 1: the gradient
            uses each row's sum.
        temperature: the softmax temperature (> 0), 0.12 in STELLAR.
        target_index: integer Tensor[M] (int64 or int32) with values in [0, T), or None (then
            T must equal M and row m uses targets[m]). The range is checked without a host
            sync: `torch._assert_async`, which raises at once for CPU tensors and is a
            device-side assertion on CUDA (it fires at a later synchronisation and leaves the
            CUDA context unusable, as any device-side assert does). The kernels never read
            out of range.
        backend: "auto" (the Triton kernels for float32/bfloat16/float16 CUDA tensors, the
            reference elsewhere: CPU tensors and float64; on CUDA without Triton installed it
            warns and uses the reference), "triton" (also CPU tensors when TRITON_INTERPRET=1),
            or "torch" (`stellar.kernels.reference.prototype_cross_entropy`).

    Returns:
        The loss, a float32 scalar (float64 for float64 inputs, reference path). Gradients
        reach `features` and `prototypes`.
    """
    _check_inputs(features, prototypes, targets, temperature, target_index)
    dtype = _compute_dtype(features)
    features = features.to(dtype)
    prototypes = prototypes.to(dtype)
    targets = targets.detach()
    if target_index is not None:
        T = targets.shape[0]
        torch._assert_async(
            ((target_index >= 0) & (target_index < T)).all(), f"target_index values must be in [0, T={T})"
        )
    if _resolve_backend(backend, features) == "torch":
        return prototype_cross_entropy_reference(features, prototypes, targets, temperature, target_index)
    loss, _ = _prototype_ce_fwd(features, prototypes, targets, target_index, float(temperature))
    return loss


def _compute_dtype(features: Tensor) -> torch.dtype:
    """features' dtype, or the autocast dtype where autocast is on for its device (float64 stays)."""
    kind = features.device.type
    if features.dtype != torch.float64 and kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return features.dtype


def _resolve_backend(backend: str, features: Tensor) -> str:
    return resolve_backend("prototype_cross_entropy", backend, features, "features")


def _check_inputs(features, prototypes, targets, temperature, target_index) -> None:
    for name, t in (("features", features), ("prototypes", prototypes), ("targets", targets)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    for name, t in (("features", features), ("prototypes", prototypes)):
        if t.dtype not in (*TRITON_DTYPES, torch.float64):
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    M, K = features.shape
    C = prototypes.shape[0]
    if prototypes.shape[1] != K:
        raise ValueError(f"width mismatch: prototypes has K={prototypes.shape[1]}, features has K={K}")
    if targets.shape[1] != C:
        raise ValueError(f"targets must have C={C} columns (one per prototype), got shape {tuple(targets.shape)}")
    if target_index is not None:
        if not isinstance(target_index, Tensor):
            raise TypeError(f"target_index must be an integer Tensor[M] or None, got {type(target_index).__name__}")
        if target_index.dtype not in INDEX_DTYPES:
            raise TypeError(f"target_index must be an int64 or int32 tensor, got {target_index.dtype}")
        if target_index.shape != (M,):
            raise ValueError(f"target_index must have shape [M={M}] (one target row per feature row), "
                             f"got {tuple(target_index.shape)}")
    elif targets.shape[0] != M:
        raise ValueError(f"targets has T={targets.shape[0]} rows but features has M={M}: pass target_index "
                         "(row m uses targets[target_index[m]]) or one target row per feature row")
    _on_one_device(features=features, prototypes=prototypes, targets=targets, target_index=target_index)
    if isinstance(temperature, Tensor) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")

"""The factorization op: `factorize` dispatches to the fused Triton kernels or to the reference.

Tier 3 of the kernel stack (tiers 1 and 2, the `@triton.jit` kernels and their launchers, are in
`factorize_triton.py`, imported on first use so that `import stellar.kernels` needs no Triton):
two `torch.library` custom ops, `stellar::factorize_fwd` and `stellar::factorize_bwd`, each with
a fake (meta) implementation, and autograd that calls the backward op; `torch.compile(fullgraph=
True)` traces through them without a graph break.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import interpreting, resolve_backend, triton_available
from .reference import factorize as factorize_reference

MAX_RANK = 128

# ----------------------------------------------------------------------------- the custom ops


@torch.library.custom_op("stellar::factorize_fwd", mutates_args=())
def _factorize_fwd(
    dense: Tensor, sparse_q: Tensor, sparse_v: Tensor, temperature: float, eps: float, return_L: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(Z[B,N,Dv], L[B,N,r] or [0], logits fp32[B,N,r], inv_n fp32[B,N], inv_k fp32[B,r])."""
    from .factorize_triton import factorize_forward

    return factorize_forward(dense, sparse_q, sparse_v, temperature, eps, return_L)


@_factorize_fwd.register_fake
def _(dense, sparse_q, sparse_v, temperature, eps, return_L):
    B, N, _ = dense.shape
    R, DV = sparse_v.shape[1], sparse_v.shape[2]
    f32 = torch.float32
    L = dense.new_empty(B, N, R) if return_L else dense.new_empty(0)
    return (dense.new_empty(B, N, DV), L, dense.new_empty(B, N, R, dtype=f32),
            dense.new_empty(B, N, dtype=f32), dense.new_empty(B, R, dtype=f32))


@torch.library.custom_op("stellar::factorize_bwd", mutates_args=())
def _factorize_bwd(
    dZ: Tensor, dL: Tensor | None, dense: Tensor, sparse_q: Tensor, sparse_v: Tensor,
    logits: Tensor, inv_n: Tensor, inv_k: Tensor, temperature: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(d_dense[B,N,D], d_sparse_q[B,r,D], d_sparse_v[B,r,Dv])."""
    from .factorize_triton import factorize_backward

    return factorize_backward(dZ, dL, dense, sparse_q, sparse_v, logits, inv_n, inv_k, temperature, eps)


@_factorize_bwd.register_fake
def _(dZ, dL, dense, sparse_q, sparse_v, logits, inv_n, inv_k, temperature, eps):
    return torch.empty_like(dense), torch.empty_like(sparse_q), torch.empty_like(sparse_v)


def _setup_context(ctx, inputs, output):
    dense, sparse_q, sparse_v, temperature, eps, return_L = inputs
    _, L, logits, inv_n, inv_k = output
    ctx.save_for_backward(dense, sparse_q, sparse_v, logits, inv_n, inv_k)
    ctx.temperature, ctx.eps, ctx.return_L = temperature, eps, return_L


def _backward(ctx, dZ, dL, d_logits, d_inv_n, d_inv_k):
    # logits, inv_n and inv_k are saved state, not outputs the caller differentiates.
    dense, sparse_q, sparse_v, logits, inv_n, inv_k = ctx.saved_tensors
    if not ctx.return_L:
        dL = None
    if dZ is None:  # only L reached the loss
        dZ = torch.zeros(dense.shape[0], dense.shape[1], sparse_v.shape[2], device=dense.device, dtype=dense.dtype)
    d_dense, d_sparse_q, d_sparse_v = _factorize_bwd(
        dZ, dL, dense, sparse_q, sparse_v, logits, inv_n, inv_k, ctx.temperature, ctx.eps
    )
    return d_dense, d_sparse_q, d_sparse_v, None, None, None


_factorize_fwd.register_autograd(_backward, setup_context=_setup_context)

# ----------------------------------------------------------------------------- the public function


def factorize(
    dense: Tensor,
    sparse_q: Tensor,
    sparse_v: Tensor,
    temperature: float = 0.06,
    eps: float = 1e-7,
    return_L: bool = True,
    backend: str = "auto",
    out_proj: torch.nn.Linear | tuple[Tensor, Tensor | None] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Spatial-semantic factorization Z = softmax_r(q k^T / T) @ V with q, k L2-normalized rows.

    Args:
        dense: Tensor[B, N, D], projected patch features (not normalized). Sets the compute dtype;
            on the Triton path fp32 dots run on TF32 tensor cores when
            `torch.backends.cuda.matmul.allow_tf32` is on (as torch.matmul does), IEEE otherwise.
        sparse_q: Tensor[B, r, D], projected sparse tokens, the keys (not normalized); 1 <= r <= 128.
        sparse_v: Tensor[B, r, Dv], the values (STELLAR: the raw tokens S). `sparse_q` and
            `sparse_v` are cast to `dense.dtype` (under autocast S may be fp32 while dense is bf16).
        temperature: softmax temperature tau_s (> 0).
        eps: floor on the L2 norms (as `F.normalize`).
        return_L: also return L (otherwise it is never written and None is returned).
        backend: "auto" (Triton for float32/bfloat16/float16 CUDA tensors when Triton is
            installed, the reference elsewhere), "triton" (also CPU tensors when TRITON_INTERPRET=1), or "torch".
        out_proj: an `nn.Linear(Dv, Do)` or a `(weight[Do, Dv], bias[Do] | None)` pair. When
            given, returns `L @ (sparse_v @ W^T) + b` = `Linear(Z)` without forming Z: the
            projection runs on the r tokens (N/r times fewer rows) and, as the rows of L sum to
            one, the bias is mixed in with them. Gradients reach W and b through autograd.

    Returns:
        Z: Tensor[B, N, Dv] (Tensor[B, N, Do] with out_proj) and L: Tensor[B, N, r] or None,
        in dense's dtype.
    """
    _check_inputs(dense, sparse_q, sparse_v, temperature)
    sparse_q = sparse_q.to(dense.dtype)
    sparse_v = sparse_v.to(dense.dtype)
    if out_proj is not None:
        weight, bias = (out_proj.weight, out_proj.bias) if isinstance(out_proj, torch.nn.Linear) else out_proj
        if weight.dim() != 2 or weight.shape[1] != sparse_v.shape[-1]:
            raise ValueError(
                f"out_proj weight must have shape [Do, Dv={sparse_v.shape[-1]}], got {tuple(weight.shape)}"
            )
        bias = None if bias is None else bias.to(dense.dtype)
        sparse_v = F.linear(sparse_v, weight.to(dense.dtype), bias)

    if _resolve_backend(backend, dense) == "torch":
        Z, L = factorize_reference(dense, sparse_q, sparse_v, temperature, eps)
        return Z, (L if return_L else None)
    Z, L, _, _, _ = _factorize_fwd(dense, sparse_q, sparse_v, float(temperature), float(eps), bool(return_L))
    return Z, (L if return_L else None)


def _resolve_backend(backend: str, dense: Tensor) -> str:
    return resolve_backend("factorize", backend, dense, "dense")


def _check_inputs(dense: Tensor, sparse_q: Tensor, sparse_v: Tensor, temperature: float) -> None:
    for name, t in (("dense", dense), ("sparse_q", sparse_q), ("sparse_v", sparse_v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    B, N, D = dense.shape
    if dense.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"dense must be float32, bfloat16, float16 or float64, got {dense.dtype}")
    if sparse_q.shape[0] != B or sparse_v.shape[0] != B:
        raise ValueError(
            f"batch mismatch: dense has B={B}, sparse_q {sparse_q.shape[0]}, sparse_v {sparse_v.shape[0]}"
        )
    if sparse_q.shape[2] != D:
        raise ValueError(f"width mismatch: sparse_q has D={sparse_q.shape[2]}, dense has D={D}")
    r = sparse_q.shape[1]
    if sparse_v.shape[1] != r:
        raise ValueError(f"rank mismatch: sparse_v has r={sparse_v.shape[1]}, sparse_q has r={r}")
    if r > MAX_RANK:
        raise ValueError(f"sparse_q has r={r} tokens; the factorization supports at most {MAX_RANK}")
    if sparse_q.device != dense.device or sparse_v.device != dense.device:
        raise ValueError(
            f"device mismatch: dense on {dense.device}, sparse_q on {sparse_q.device}, sparse_v on {sparse_v.device}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


# ----------------------------------------------------------------------------- environment


def backend_info() -> dict:
    """What the factorization can run on here (for `stellar info`).

    Returns:
        {"triton_available": bool, "triton_version": str | None, "interpreter": bool,
         "cuda_available": bool, "auto_backend": "triton" | "torch" (for CUDA tensors when CUDA
         is available, else for CPU tensors), "fp32_dots": "tf32" | "ieee" (follows
         torch.backends.cuda.matmul.allow_tf32), "mix_precision": {16-bit dtype: policy} (the
         tile table's MIX, or STELLAR_FACTORIZE_MIX_PRECISION), "tiles_tuned": "k of n entries"
         of the tile table tuned on a GPU}.
    """
    available = triton_available()
    version = None
    if available:
        from importlib.metadata import PackageNotFoundError, version as _version

        try:
            version = _version("triton")
        except PackageNotFoundError:
            version = None
    cuda = torch.cuda.is_available()
    from . import factorize_tiles

    knob = os.environ.get("STELLAR_FACTORIZE_MIX_PRECISION", "").strip()
    with open(factorize_tiles.__file__) as f:
        tuned = sum(1 for line in f if line.startswith("    (") and "# tuned" in line)
    return {
        "triton_available": available,
        "triton_version": version,
        "interpreter": interpreting(),
        "cuda_available": cuda,
        "auto_backend": "triton" if (cuda and available) else "torch",
        "fp32_dots": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",
        "mix_precision": {k: knob or v for k, v in factorize_tiles.MIX.items()},
        "tiles_tuned": f"{tuned} of {len(factorize_tiles.TILES)} entries",
    }

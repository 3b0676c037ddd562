"""Fused Triton kernels for the spatial-semantic factorization, and their launchers.

Tier 1 (private `@triton.jit` kernels) and tier 2 (launchers that pick block sizes and
allocate outputs); the custom op, its fake implementation and autograd live in
`stellar.kernels.factorize`, which imports this module only when the Triton path runs.

    x      = dense[b, n]                        [D]
    c[j]   = <x / |x|, s_j / |s_j|>             cosine to the r keys s = sparse_q[b]
    logits = c / T                              [r]   (saved in fp32 for the backward)
    L      = softmax(logits)                    [r]
    Z      = L @ sparse_v[b]                    [Dv]

Forward: one program per (tile of BLOCK_N patches, image). It streams the patch rows and the r
keys over D once, accumulating the raw products x @ s^T and both squared norms in fp32, so the
patch rows are normalized in registers (the norms are applied to the [BLOCK_N, r] product, never
to the [BLOCK_N, D] tile); exact softmax over r padded to a power of two with masking; then Z is
streamed out over Dv. Bytes: read dense once, write Z (and L when asked), plus r + 1 fp32 per row
saved for the backward (logits and 1/|x|) instead of recomputing them from dense.

Backward, with dc = dlogits / T and the saved logits:
    dL      = dZ @ V^T (+ incoming dL)
    dlogits = L * (dL - rowsum(dL * L))
    dV      = L^T @ dZ                           reduced over N
    dk_hat  = (dc * inv_n)^T @ x                 reduced over N (keys' backward done in torch)
    dx      = inv_n * ((dc * inv_k) @ s - <dc, c> * x * inv_n)      (only <dc, c> is needed for
                                                                    the projection term: r-space)
The per-image [r, D] and [r, Dv] reductions are written as per-tile fp32 partials (one tile per
image when N <= BLOCK_N, the common case) and summed by the launcher. Bytes: read dZ and dense
once, write d_dense once.

Precision: dots of two input tiles (x @ s^T, dZ @ V^T) run on the input dtype with fp32
accumulation (tensor cores for 16-bit inputs); dots of an fp32 intermediate (L, dlogits) with an
input tile keep the intermediate in fp32 and upcast the tile (3-pass TF32 on the GPU), which
halves the bf16 error of Z and d_dense against rounding L and dlogits to bf16. In the interpreter
(TRITON_INTERPRET=1, CPU tensors) `tl.dot` on bf16 operands is wrong, so UPCAST makes every dot
take fp32 operands there.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# ----------------------------------------------------------------------------- tier 1: kernels


@triton.jit
def _factorize_fwd_kernel(
    X, SQ, SV, Z, L, LOGITS, INV_N, INV_K,
    N, R, D, DV,
    stride_xb, stride_xn, stride_xd,
    stride_qb, stride_qr, stride_qd,
    stride_vb, stride_vr, stride_vd,
    inv_temperature, eps,
    WRITE_L: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, MIX_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask_r = offs_r < R
    x_base = X + b * stride_xb + offs_n[:, None] * stride_xn
    q_base = SQ + b * stride_qb + offs_r[:, None] * stride_qr

    # x @ s^T and both squared norms, one pass over D.
    acc = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    x_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        x = tl.load(x_base + offs_d[None, :] * stride_xd, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        k = tl.load(q_base + offs_d[None, :] * stride_qd, mask=mask_r[:, None] & mask_d[None, :], other=0.0)
        xf = x.to(tl.float32)
        kf = k.to(tl.float32)
        x_sq += tl.sum(xf * xf, axis=1)
        k_sq += tl.sum(kf * kf, axis=1)
        if UPCAST:
            acc = tl.dot(xf, tl.trans(kf), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(x, tl.trans(k), acc, input_precision=PRECISION)

    inv_n = 1.0 / tl.maximum(tl.sqrt(x_sq), eps)
    inv_k = 1.0 / tl.maximum(tl.sqrt(k_sq), eps)
    logits = acc * inv_n[:, None] * inv_k[None, :] * inv_temperature
    logits = tl.where(mask_r[None, :], logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = p / tl.sum(p, axis=1)[:, None]

    row = b * N + offs_n
    nr_mask = mask_n[:, None] & mask_r[None, :]
    tl.store(LOGITS + row[:, None] * R + offs_r[None, :], logits, mask=nr_mask)
    tl.store(INV_N + row, inv_n, mask=mask_n)
    tl.store(INV_K + b * R + offs_r, inv_k, mask=mask_r & (pid_n == 0))
    if WRITE_L:
        tl.store(L + row[:, None] * R + offs_r[None, :], probs.to(L.dtype.element_ty), mask=nr_mask)

    # Z = L @ V, streamed over Dv, with L kept in fp32 (the values are exact in fp32).
    v_base = SV + b * stride_vb + offs_r[:, None] * stride_vr
    z_base = Z + row[:, None] * DV
    for e0 in range(0, DV, BLOCK_DV):
        offs_e = e0 + tl.arange(0, BLOCK_DV)
        mask_e = offs_e < DV
        v = tl.load(v_base + offs_e[None, :] * stride_vd, mask=mask_r[:, None] & mask_e[None, :], other=0.0)
        z = tl.dot(probs, v.to(tl.float32), input_precision=MIX_PRECISION)
        tl.store(z_base + offs_e[None, :], z.to(Z.dtype.element_ty), mask=mask_n[:, None] & mask_e[None, :])


@triton.jit
def _factorize_bwd_kernel(
    X, SQ, SV, DZ, DL, LOGITS, INV_N, INV_K,
    DX, DV_PART, DK_PART,
    N, R, D, DV,
    stride_xb, stride_xn, stride_xd,
    stride_qb, stride_qr, stride_qd,
    stride_vb, stride_vr, stride_vd,
    stride_zb, stride_zn, stride_zd,
    stride_lb, stride_ln, stride_lr,
    inv_temperature, eps,
    HAS_DL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, MIX_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_tiles = tl.num_programs(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask_r = offs_r < R
    nr_mask = mask_n[:, None] & mask_r[None, :]
    row = b * N + offs_n

    # L from the saved logits (r fp32 per row: far fewer bytes than recomputing from dense).
    logits = tl.load(LOGITS + row[:, None] * R + offs_r[None, :], mask=nr_mask, other=0.0)
    inv_n = tl.load(INV_N + row, mask=mask_n, other=1.0)
    inv_k = tl.load(INV_K + b * R + offs_r, mask=mask_r, other=0.0)
    masked = tl.where(mask_r[None, :], logits, float("-inf"))
    p = tl.exp(masked - tl.max(masked, axis=1)[:, None])
    probs = p / tl.sum(p, axis=1)[:, None]

    # Pass over Dv: dL = dZ @ V^T, and this tile's share of dV = L^T @ dZ (padded rows of dZ
    # load as 0, so they add nothing).
    part = (b * n_tiles + pid_n) * R
    dprobs = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    dz_base = DZ + b * stride_zb + offs_n[:, None] * stride_zn
    v_base = SV + b * stride_vb + offs_r[:, None] * stride_vr
    for e0 in range(0, DV, BLOCK_DV):
        offs_e = e0 + tl.arange(0, BLOCK_DV)
        mask_e = offs_e < DV
        dz = tl.load(dz_base + offs_e[None, :] * stride_zd, mask=mask_n[:, None] & mask_e[None, :], other=0.0)
        v = tl.load(v_base + offs_e[None, :] * stride_vd, mask=mask_r[:, None] & mask_e[None, :], other=0.0)
        dz = dz.to(SV.dtype.element_ty)
        if UPCAST:
            dprobs = tl.dot(dz.to(tl.float32), tl.trans(v.to(tl.float32)), dprobs, input_precision=PRECISION)
        else:
            dprobs = tl.dot(dz, tl.trans(v), dprobs, input_precision=PRECISION)
        dv = tl.dot(tl.trans(probs), dz.to(tl.float32), input_precision=MIX_PRECISION)
        tl.store(DV_PART + (part + offs_r[:, None]) * DV + offs_e[None, :], dv, mask=mask_r[:, None] & mask_e[None, :])
    if HAS_DL:
        dl_ptr = DL + b * stride_lb + offs_n[:, None] * stride_ln + offs_r[None, :] * stride_lr
        dprobs += tl.load(dl_ptr, mask=nr_mask, other=0.0).to(tl.float32)

    # Softmax backward; the 1/T of the logits folds into dc.
    dlogits = probs * (dprobs - tl.sum(dprobs * probs, axis=1)[:, None])
    dc = tl.where(nr_mask, dlogits * inv_temperature, 0.0)
    cosine = logits / inv_temperature
    # <dq, q_hat> = <dc, c>: the normalization's projection term needs only r-space values.
    # Rows whose norm was clamped to eps are divided by a constant: no projection term.
    proj = tl.sum(dc * cosine, axis=1)
    proj = tl.where(inv_n * eps < 1.0, proj, 0.0)
    a = dc * inv_k[None, :]  # dq = a @ s
    bq = dc * inv_n[:, None]  # dk_hat = bq^T @ x

    # Pass over D: d_dense, and this tile's share of dk_hat.
    x_base = X + b * stride_xb + offs_n[:, None] * stride_xn
    q_base = SQ + b * stride_qb + offs_r[:, None] * stride_qr
    dx_base = DX + row[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        x = tl.load(x_base + offs_d[None, :] * stride_xd, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        k = tl.load(q_base + offs_d[None, :] * stride_qd, mask=mask_r[:, None] & mask_d[None, :], other=0.0)
        xf = x.to(tl.float32)
        dq = tl.dot(a, k.to(tl.float32), input_precision=MIX_PRECISION)
        dx = inv_n[:, None] * (dq - proj[:, None] * xf * inv_n[:, None])
        tl.store(dx_base + offs_d[None, :], dx.to(DX.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
        dk = tl.dot(tl.trans(bq), xf, input_precision=MIX_PRECISION)
        tl.store(DK_PART + (part + offs_r[:, None]) * D + offs_d[None, :], dk, mask=mask_r[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------- tier 2: launchers


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_guard(device: torch.device):
    """Launch on the tensors' GPU, not the current one (no-op for CPU tensors in the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _blocks(N: int, R: int, D: int, DV: int, itemsize: int, max_block_n: int) -> dict:
    """Block sizes: r padded to a power of two (>= 16 for tl.dot); as many patches per tile as
    the [BLOCK_N, BLOCK_R] fp32 tiles and the [BLOCK_N, BLOCK_D] input tiles allow, so that most
    images are one tile (no partials to reduce over N). Chosen by reasoning, not yet tuned on a
    GPU; STELLAR_FACTORIZE_BLOCK_N caps BLOCK_N for tuning."""
    block_r = max(16, triton.next_power_of_2(R))
    cap = 256 if block_r <= 32 else 4096 // block_r
    cap = min(cap, 128 if itemsize > 2 else cap, max_block_n)
    knob = os.environ.get("STELLAR_FACTORIZE_BLOCK_N")
    if knob:
        cap = min(cap, int(knob))
    block_n = min(max(16, triton.next_power_of_2(N)), max(16, cap))
    block_d = min(64, max(16, triton.next_power_of_2(D)))
    block_dv = min(64, max(16, triton.next_power_of_2(DV)))
    return dict(BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_DV=block_dv)


def _launch_options(blocks: dict, dtype: torch.dtype) -> dict:
    """UPCAST: fp32 operands for the 16-bit dots (the interpreter's bf16 dot is wrong).
    PRECISION: dots of two input-dtype tiles (exact products for fp32 inputs).
    MIX_PRECISION: dots of an fp32 intermediate (L, dlogits) with an upcast input tile: 3-pass
    TF32 on the GPU for 16-bit inputs (near-fp32, on tensor cores; STELLAR_FACTORIZE_MIX_PRECISION
    overrides), exact for fp32 inputs and in the interpreter."""
    interpret = _interpreting()
    mix = "ieee" if interpret or dtype == torch.float32 else os.environ.get("STELLAR_FACTORIZE_MIX_PRECISION", "tf32x3")
    options = dict(UPCAST=interpret, PRECISION="ieee", MIX_PRECISION=mix)
    if not interpret:
        options["num_warps"] = 8 if blocks["BLOCK_N"] * max(blocks["BLOCK_R"], 32) >= 4096 else 4
    return options


# The largest BLOCK_N that compiled within the shared memory and registers of the device, per
# (kernel, dtype, padded r); lowered when a launch raises OutOfResources.
_MAX_BLOCK_N: dict = {}


def _launch_with_fallback(kind: str, dtype: torch.dtype, N: int, R: int, D: int, DV: int, launch):
    """Call `launch(blocks)`; on OutOfResources halve BLOCK_N (down to 16) and retry."""
    key = (kind, dtype, max(16, triton.next_power_of_2(R)))
    while True:
        blocks = _blocks(N, R, D, DV, torch.finfo(dtype).bits // 8, _MAX_BLOCK_N.get(key, 256))
        try:
            return launch(blocks)
        except triton.runtime.errors.OutOfResources:
            if blocks["BLOCK_N"] <= 16:
                raise
            _MAX_BLOCK_N[key] = blocks["BLOCK_N"] // 2


def factorize_forward(
    dense: Tensor, sparse_q: Tensor, sparse_v: Tensor, temperature: float, eps: float, return_L: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launch the forward kernel (inputs already checked: same device and dtype, 1 <= r <= 128).

    Args:
        dense: Tensor[B, N, D]; sparse_q: Tensor[B, r, D]; sparse_v: Tensor[B, r, Dv]; any strides.

    Returns:
        Z: Tensor[B, N, Dv]; L: Tensor[B, N, r] (Tensor[0] when not return_L); logits:
        float32 Tensor[B, N, r]; inv_n: float32 Tensor[B, N]; inv_k: float32 Tensor[B, r].
    """
    B, N, D = dense.shape
    R, DV = sparse_v.shape[1], sparse_v.shape[2]
    dev = dense.device
    Z = torch.empty(B, N, DV, device=dev, dtype=dense.dtype)
    L = torch.empty(B, N, R, device=dev, dtype=dense.dtype) if return_L else torch.empty(0, device=dev, dtype=dense.dtype)
    logits = torch.empty(B, N, R, device=dev, dtype=torch.float32)
    inv_n = torch.empty(B, N, device=dev, dtype=torch.float32)
    inv_k = torch.empty(B, R, device=dev, dtype=torch.float32)

    def launch(blocks):
        _factorize_fwd_kernel[(triton.cdiv(N, blocks["BLOCK_N"]), B)](
            dense, sparse_q, sparse_v, Z, L, logits, inv_n, inv_k,
            N, R, D, DV,
            *dense.stride(), *sparse_q.stride(), *sparse_v.stride(),
            1.0 / temperature, eps,
            WRITE_L=return_L, **blocks, **_launch_options(blocks, dense.dtype),
        )

    with _device_guard(dev):
        _launch_with_fallback("fwd", dense.dtype, N, R, D, DV, launch)
    return Z, L, logits, inv_n, inv_k


def factorize_backward(
    dZ: Tensor, dL: Tensor | None, dense: Tensor, sparse_q: Tensor, sparse_v: Tensor,
    logits: Tensor, inv_n: Tensor, inv_k: Tensor, temperature: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward kernel and reduce the per-tile partials.

    Args:
        dZ: Tensor[B, N, Dv]; dL: Tensor[B, N, r] or None; the forward's inputs and its saved
        logits [B, N, r], inv_n [B, N], inv_k [B, r] (fp32).

    Returns:
        d_dense: Tensor[B, N, D], d_sparse_q: Tensor[B, r, D], d_sparse_v: Tensor[B, r, Dv], in
        the inputs' dtype.
    """
    B, N, D = dense.shape
    R, DV = sparse_v.shape[1], sparse_v.shape[2]
    dev = dense.device
    d_dense = torch.empty(B, N, D, device=dev, dtype=dense.dtype)
    has_dl = dL is not None
    dl_arg = dL if has_dl else logits  # any tensor; never read when HAS_DL is False
    dl_strides = dL.stride() if has_dl else (0, 0, 0)

    def launch(blocks):
        n_tiles = triton.cdiv(N, blocks["BLOCK_N"])
        dv_part = torch.empty(B, n_tiles, R, DV, device=dev, dtype=torch.float32)
        dk_part = torch.empty(B, n_tiles, R, D, device=dev, dtype=torch.float32)
        _factorize_bwd_kernel[(n_tiles, B)](
            dense, sparse_q, sparse_v, dZ, dl_arg, logits, inv_n, inv_k,
            d_dense, dv_part, dk_part,
            N, R, D, DV,
            *dense.stride(), *sparse_q.stride(), *sparse_v.stride(), *dZ.stride(), *dl_strides,
            1.0 / temperature, eps,
            HAS_DL=has_dl, **blocks, **_launch_options(blocks, dense.dtype),
        )
        return n_tiles, dv_part, dk_part

    with _device_guard(dev):
        n_tiles, dv_part, dk_part = _launch_with_fallback("bwd", dense.dtype, N, R, D, DV, launch)
    d_sparse_v = dv_part.sum(1) if n_tiles > 1 else dv_part[:, 0]
    dk_hat = dk_part.sum(1) if n_tiles > 1 else dk_part[:, 0]
    # Keys' normalization backward on [B, r, D] (small): ds = (dk - <dk, k_hat> k_hat) / |s|,
    # without the projection term where the norm was clamped to eps.
    k_hat = sparse_q.float() * inv_k[..., None]
    proj = (dk_hat * k_hat).sum(-1, keepdim=True) * (inv_k[..., None] * eps < 1.0)
    d_sparse_q = inv_k[..., None] * (dk_hat - proj * k_hat)
    return d_dense, d_sparse_q.to(sparse_q.dtype), d_sparse_v.to(sparse_v.dtype)

"""Fused Triton kernels for the spatial-semantic factorization, and their launchers.

Tier 1 (private `@triton.jit` kernels) and tier 2 (launchers that take their tiles from the
table in `factorize_tiles.py` and allocate outputs); the custom op, its fake implementation and
autograd live in `stellar.kernels.factorization`, which imports this module only when the Triton
path runs.

    x      = dense[b, n]                        [D]
    c[j]   = <x / |x|, s_j / |s_j|>             cosine to the r keys s = sparse_q[b]
    logits = c / T                              [r]   (saved in fp32 for the backward)
    L      = softmax(logits)                    [r]
    Z      = L @ sparse_v[b]                    [Dv]

Forward (`_fwd_kernel`), one program per (tile of BLOCK_N patches, image): streams the patch rows
and the r keys over D once, accumulating x @ s^T and both squared norms in fp32, so the rows are
normalized in registers (the norms scale the [BLOCK_N, r] product, never the [BLOCK_N, D] tile);
exact softmax over r padded to a power of two; Z streamed out over Dv. Bytes: read dense once,
write Z (and L when asked), plus r + 1 fp32 per row for the backward (logits, 1/|x|).

Backward, with dc = dlogits / T, in three kernels so that no program holds both passes:
    `_bwd_rows_kernel`   per row tile: dL = dZ @ V^T (+ incoming dL), dlogits = L * (dL -
                         rowsum(dL * L)); writes g = dc / |x| (r fp32 per row) and
                         p = <dc, c> / |x|^2 (one fp32: the normalization's projection term).
    `_bwd_dense_kernel`  per (BLOCK_C columns of D, image), looping over the rows:
                         d_dense = (g / |s|) @ s - p x and dk_hat^T += x^T @ g; the reduction over
                         N stays inside the program (no partial sums, deterministic).
    `_bwd_values_kernel` per (BLOCK_C columns of Dv, image): dV^T += dZ^T @ L over the rows.
    `_bwd_keys_kernel`   per image: the keys' normalization backward on dk_hat [r, D].
The column-tiled dots put the wide side (columns) in the M position, so 64-row tensor-core
instructions (wgmma on Hopper) serve them at any r. Bytes: read dZ twice, dense once, write
d_dense once, plus O(r) fp32 per row and O(r (D + Dv)) per image.

Precision (`_precisions`): dots of two input tiles (x @ s^T, dZ @ V^T) take the input dtype with
fp32 accumulation: 16-bit tensor cores, and for fp32 inputs TF32 tensor cores when
`torch.backends.cuda.matmul.allow_tf32` is on (IEEE FMA otherwise, as torch.matmul). Dots of an
fp32 intermediate (L, g) with an input tile follow the table's MIX policy for 16-bit inputs
("input", "tf32", "tf32x3" or "ieee"; knob STELLAR_FACTORIZE_MIX_PRECISION) and the input-tile
rule for fp32 inputs. In the interpreter (TRITON_INTERPRET=1, CPU tensors) `tl.dot` on bf16
operands is wrong, so every dot takes fp32 operands there (UPCAST), and the GPU's rounding of the
operands (TF32 keeps 10 mantissa bits; "input" rounds to the 16-bit dtype) is applied first, so
the interpreter tests measure the error of the precision actually chosen.
"""
from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import factorize_tiles
from ._dispatch import device_guard, interpreting, recoverable_launch_failure

# ----------------------------------------------------------------------------- tier 1: kernels


@triton.jit
def _round(x, ROUND: tl.constexpr):
    """What a GPU dot does to an fp32 operand, for the interpreter: "tf32" drops the 13 low
    mantissa bits (the tensor cores ignore them), "bf16" / "fp16" round to that dtype."""
    if ROUND == "tf32":
        x = (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    elif ROUND == "bf16":
        x = x.to(tl.bfloat16).to(tl.float32)
    elif ROUND == "fp16":
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _dot_in(a, b, acc, UPCAST: tl.constexpr, ROUND: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b for two input-dtype tiles."""
    if UPCAST:
        acc = tl.dot(_round(a.to(tl.float32), ROUND), _round(b.to(tl.float32), ROUND), acc, input_precision=PREC)
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _mix_op(x32, DT: tl.constexpr, CAST: tl.constexpr, ROUND: tl.constexpr):
    """An fp32 intermediate as a dot operand: rounded to the input dtype DT for the 16-bit tensor
    cores (CAST), else left in fp32 for the dot's input_precision."""
    x32 = _round(x32, ROUND)
    if CAST:
        op = x32.to(DT)
    else:
        op = x32
    return op


@triton.jit
def _mix_in(t, CAST: tl.constexpr, ROUND: tl.constexpr):
    """An input tile as the partner of an fp32 intermediate: as it is (CAST), else upcast."""
    if CAST:
        op = t
    else:
        op = _round(t.to(tl.float32), ROUND)
    return op


@triton.jit
def _softmax_rows(logits, mask_r):
    """Exact softmax over the (padded) r axis of a [rows, BLOCK_R] fp32 tile."""
    masked = tl.where(mask_r[None, :], logits, float("-inf"))
    p = tl.exp(masked - tl.max(masked, axis=1)[:, None])
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _fwd_kernel(
    X, SQ, SV, Z, L, LOGITS, INV_N, INV_K,
    N, R, D, DV,
    stride_xb, stride_xn, stride_xd,
    stride_qb, stride_qr, stride_qd,
    stride_vb, stride_vr, stride_vd,
    inv_temperature, eps,
    WRITE_L: tl.constexpr, UPCAST: tl.constexpr,
    DOT_ROUND: tl.constexpr, DOT_PREC: tl.constexpr,
    MIX_CAST: tl.constexpr, MIX_ROUND: tl.constexpr, MIX_PREC: tl.constexpr,
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

    # x @ s^T and both squared norms, one pass over D. Only the dot touches `acc` in this loop.
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
        acc = _dot_in(x, tl.trans(k), acc, UPCAST, DOT_ROUND, DOT_PREC)

    inv_n = 1.0 / tl.maximum(tl.sqrt(x_sq), eps)
    inv_k = 1.0 / tl.maximum(tl.sqrt(k_sq), eps)
    logits = acc * inv_n[:, None] * inv_k[None, :] * inv_temperature
    probs = _softmax_rows(logits, mask_r)

    row = b * N + offs_n
    nr_mask = mask_n[:, None] & mask_r[None, :]
    tl.store(LOGITS + row[:, None] * R + offs_r[None, :], logits, mask=nr_mask)
    tl.store(INV_N + row, inv_n, mask=mask_n)
    tl.store(INV_K + b * R + offs_r, inv_k, mask=mask_r & (pid_n == 0))
    if WRITE_L:
        tl.store(L + row[:, None] * R + offs_r[None, :], probs.to(L.dtype.element_ty), mask=nr_mask)

    # Z = L @ V, streamed over Dv.
    p_op = _mix_op(probs, SV.dtype.element_ty, MIX_CAST, MIX_ROUND)
    v_base = SV + b * stride_vb + offs_r[:, None] * stride_vr
    z_base = Z + row[:, None] * DV
    for e0 in range(0, DV, BLOCK_DV):
        offs_e = e0 + tl.arange(0, BLOCK_DV)
        mask_e = offs_e < DV
        v = tl.load(v_base + offs_e[None, :] * stride_vd, mask=mask_r[:, None] & mask_e[None, :], other=0.0)
        z = tl.dot(p_op, _mix_in(v, MIX_CAST, MIX_ROUND), input_precision=MIX_PREC)
        tl.store(z_base + offs_e[None, :], z.to(Z.dtype.element_ty), mask=mask_n[:, None] & mask_e[None, :])


@triton.jit
def _bwd_rows_kernel(
    SV, DZ, DL, LOGITS, INV_N, DC, P,
    N, R, DV,
    stride_vb, stride_vr, stride_vd,
    stride_zb, stride_zn, stride_zd,
    stride_lb, stride_ln, stride_lr,
    inv_temperature, eps,
    HAS_DL: tl.constexpr, UPCAST: tl.constexpr, DOT_ROUND: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask_r = offs_r < R
    nr_mask = mask_n[:, None] & mask_r[None, :]
    row = b * N + offs_n

    # dL = dZ @ V^T over Dv; only the dot touches `dprobs` in this loop.
    dprobs = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    dz_base = DZ + b * stride_zb + offs_n[:, None] * stride_zn
    v_base = SV + b * stride_vb + offs_r[:, None] * stride_vr
    for e0 in range(0, DV, BLOCK_DV):
        offs_e = e0 + tl.arange(0, BLOCK_DV)
        mask_e = offs_e < DV
        dz = tl.load(dz_base + offs_e[None, :] * stride_zd, mask=mask_n[:, None] & mask_e[None, :], other=0.0)
        v = tl.load(v_base + offs_e[None, :] * stride_vd, mask=mask_r[:, None] & mask_e[None, :], other=0.0)
        dprobs = _dot_in(dz.to(SV.dtype.element_ty), tl.trans(v), dprobs, UPCAST, DOT_ROUND, DOT_PREC)
    if HAS_DL:
        dl_ptr = DL + b * stride_lb + offs_n[:, None] * stride_ln + offs_r[None, :] * stride_lr
        dprobs += tl.load(dl_ptr, mask=nr_mask, other=0.0).to(tl.float32)

    # L from the saved logits; softmax backward, the 1/T of the logits folded into dc.
    logits = tl.load(LOGITS + row[:, None] * R + offs_r[None, :], mask=nr_mask, other=0.0)
    inv_n = tl.load(INV_N + row, mask=mask_n, other=1.0)
    probs = _softmax_rows(logits, mask_r)
    dlogits = probs * (dprobs - tl.sum(dprobs * probs, axis=1)[:, None])
    dc = tl.where(nr_mask, dlogits * inv_temperature, 0.0)
    # <dq, q_hat> = <dc, c>: the normalization's projection term needs only r-space values.
    # Rows whose norm was clamped to eps are divided by a constant: no projection term.
    proj = tl.sum(dc * (logits / inv_temperature), axis=1)
    proj = tl.where(inv_n * eps < 1.0, proj, 0.0)
    tl.store(DC + row[:, None] * R + offs_r[None, :], dc, mask=nr_mask)
    tl.store(P + row, proj * inv_n * inv_n, mask=mask_n)


@triton.jit
def _bwd_dense_kernel(
    X, SQ, DC, P, INV_N, INV_K, DX, DK,
    N, R, D,
    stride_xb, stride_xn, stride_xd,
    stride_qb, stride_qr, stride_qd,
    MIX_CAST: tl.constexpr, MIX_ROUND: tl.constexpr, MIX_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    mask_d = offs_d < D
    mask_r = offs_r < R
    DT = X.dtype.element_ty
    # The dots take unit-scale operands (k_hat = s / |s|, q = x / |x|, dc), the norms are applied
    # outside them: no overflow when a 16-bit operand meets a norm clamped to eps.
    k = tl.load(SQ + b * stride_qb + offs_r[:, None] * stride_qr + offs_d[None, :] * stride_qd,
                mask=mask_r[:, None] & mask_d[None, :], other=0.0)
    inv_k = tl.load(INV_K + b * R + offs_r, mask=mask_r, other=0.0)
    k_hat = _mix_op(k.to(tl.float32) * inv_k[:, None], DT, MIX_CAST, MIX_ROUND)

    # d_dense = dc @ k_hat / |x| - p x per row tile; dk_hat^T = q^T @ dc summed over all rows here.
    dk_t = tl.zeros([BLOCK_D, BLOCK_R], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        row = b * N + offs_n
        x = tl.load(X + b * stride_xb + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        dc = tl.load(DC + row[:, None] * R + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        inv_n = tl.load(INV_N + row, mask=mask_n, other=0.0)
        p = tl.load(P + row, mask=mask_n, other=0.0)
        dc_op = _mix_op(dc, DT, MIX_CAST, MIX_ROUND)
        dq = tl.dot(dc_op, k_hat, input_precision=MIX_PREC)
        dx = inv_n[:, None] * dq - p[:, None] * x
        tl.store(DX + row[:, None] * D + offs_d[None, :], dx.to(DT), mask=mask_n[:, None] & mask_d[None, :])
        q_op = _mix_op(tl.trans(x * inv_n[:, None]), DT, MIX_CAST, MIX_ROUND)
        dk_t = tl.dot(q_op, dc_op, dk_t, input_precision=MIX_PREC)
    tl.store(DK + (b * R + offs_r[None, :]) * D + offs_d[:, None], dk_t, mask=mask_d[:, None] & mask_r[None, :])


@triton.jit
def _bwd_values_kernel(
    DZ, LOGITS, DSV,
    N, R, DV,
    stride_zb, stride_zn, stride_zd,
    MIX_CAST: tl.constexpr, MIX_ROUND: tl.constexpr, MIX_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_e = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_e = pid_e * BLOCK_DV + tl.arange(0, BLOCK_DV)
    offs_r = tl.arange(0, BLOCK_R)
    mask_e = offs_e < DV
    mask_r = offs_r < R
    DT = DSV.dtype.element_ty

    # dV^T = dZ^T @ L summed over all rows here (L recomputed from the saved logits).
    dv_t = tl.zeros([BLOCK_DV, BLOCK_R], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        row = b * N + offs_n
        logits = tl.load(LOGITS + row[:, None] * R + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        probs = tl.where(mask_n[:, None], _softmax_rows(logits, mask_r), 0.0)
        dz = tl.load(DZ + b * stride_zb + offs_n[:, None] * stride_zn + offs_e[None, :] * stride_zd,
                     mask=mask_n[:, None] & mask_e[None, :], other=0.0)
        dv_t = tl.dot(_mix_in(tl.trans(dz.to(DT)), MIX_CAST, MIX_ROUND), _mix_op(probs, DT, MIX_CAST, MIX_ROUND),
                      dv_t, input_precision=MIX_PREC)
    tl.store(DSV + (b * R + offs_r[None, :]) * DV + offs_e[:, None], dv_t.to(DT), mask=mask_e[:, None] & mask_r[None, :])


@triton.jit
def _bwd_keys_kernel(
    SQ, DK, INV_K, DSQ,
    R, D,
    stride_qb, stride_qr, stride_qd,
    eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # ds = (dk - <dk, k_hat> k_hat) / |s|, without the projection term where |s| was clamped.
    b = tl.program_id(0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    inv_k = tl.load(INV_K + b * R + offs_r, mask=mask_r, other=0.0)
    q_base = SQ + b * stride_qb + offs_r[:, None] * stride_qr
    dk_base = DK + (b * R + offs_r[:, None]) * D
    proj = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_r[:, None] & (offs_d < D)[None, :]
        k_hat = tl.load(q_base + offs_d[None, :] * stride_qd, mask=mask, other=0.0).to(tl.float32) * inv_k[:, None]
        dk = tl.load(dk_base + offs_d[None, :], mask=mask, other=0.0)
        proj += tl.sum(dk * k_hat, axis=1)
    proj = tl.where(inv_k * eps < 1.0, proj, 0.0)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_r[:, None] & (offs_d < D)[None, :]
        k_hat = tl.load(q_base + offs_d[None, :] * stride_qd, mask=mask, other=0.0).to(tl.float32) * inv_k[:, None]
        dk = tl.load(dk_base + offs_d[None, :], mask=mask, other=0.0)
        ds = inv_k[:, None] * (dk - proj[:, None] * k_hat)
        tl.store(DSQ + (b * R + offs_r[:, None]) * D + offs_d[None, :], ds.to(DSQ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- tier 2: launchers

KERNELS = ("fwd", "rows", "dense", "values")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32-tf32", "float32")
MIX_CHOICES = ("input", "tf32", "tf32x3", "ieee")
_POW2 = (16, 32, 64, 128, 256)
_WARPS = (1, 2, 4, 8, 16)


def compute_name(dtype: torch.dtype) -> str:
    """The table's dtype key: the dtype the dots compute in ("float32-tf32" for fp32 inputs when
    torch.backends.cuda.matmul.allow_tf32 is on, "float32" for IEEE fp32)."""
    name = str(dtype).replace("torch.", "")
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        name += "-tf32"
    return name


def table_key(dtype: torch.dtype, R: int, D: int, DV: int) -> tuple:
    """(compute dtype name, r bucket, D bucket) of factorize_tiles.TILES for these sizes."""
    r_bucket = max(16, triton.next_power_of_2(R))
    width = max(D, DV)
    d_bucket = next((b for b in factorize_tiles.D_BUCKETS if b is None or width <= b), None)
    return (compute_name(dtype), r_bucket, d_bucket)


def check_tile(tile, where: str) -> tuple:
    """A (BLOCK_N, BLOCK_C, num_warps, num_stages) entry, validated; ValueError naming `where`."""
    if not (isinstance(tile, tuple) and len(tile) == 4 and all(isinstance(v, int) for v in tile)):
        raise ValueError(f"{where} must be a tuple (BLOCK_N, BLOCK_C, num_warps, num_stages) of ints, got {tile!r}")
    block_n, block_c, warps, stages = tile
    for name, v in (("BLOCK_N", block_n), ("BLOCK_C", block_c)):
        if v not in _POW2:
            raise ValueError(f"{where}: {name}={v} must be a power of two in {_POW2[0]}..{_POW2[-1]}")
    if warps not in _WARPS:
        raise ValueError(f"{where}: num_warps={warps} must be one of {_WARPS}")
    if not 1 <= stages <= 8:
        raise ValueError(f"{where}: num_stages={stages} must be in 1..8")
    return tile


_TABLE_CHECKED = [False]


def _check_table() -> None:
    """Every entry of factorize_tiles.TILES and MIX, once per process (and after a rewrite)."""
    if _TABLE_CHECKED[0]:
        return
    for key, entry in factorize_tiles.TILES.items():
        dtype, r_bucket, d_bucket = key
        if dtype not in COMPUTE_DTYPES or r_bucket not in factorize_tiles.R_BUCKETS \
                or d_bucket not in factorize_tiles.D_BUCKETS:
            raise ValueError(f"factorize_tiles.TILES: bad key {key!r} (dtype name, r bucket in "
                             f"{factorize_tiles.R_BUCKETS}, D bucket in {factorize_tiles.D_BUCKETS})")
        if set(entry) != set(KERNELS):
            raise ValueError(f"factorize_tiles.TILES[{key!r}] must have exactly the kernels {KERNELS}, got {sorted(entry)}")
        for kernel, tile in entry.items():
            check_tile(tile, f"factorize_tiles.TILES[{key!r}][{kernel!r}]")
    for dtype, mix in factorize_tiles.MIX.items():
        if mix not in MIX_CHOICES:
            raise ValueError(f"factorize_tiles.MIX[{dtype!r}]={mix!r} must be one of {MIX_CHOICES}")
    _TABLE_CHECKED[0] = True


def render_table(tiles: dict, mix: dict, notes: dict) -> str:
    """The text of factorize_tiles.py for this table; `notes[key]` becomes the entry's comment
    (the device and date it was tuned on)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "factorize_tiles.py")) as f:
        doc = f.read().split('"""', 2)[1]
    lines = [f'"""{doc}"""', "", f"R_BUCKETS = {factorize_tiles.R_BUCKETS!r}",
             f"D_BUCKETS = {factorize_tiles.D_BUCKETS!r}", "", f"MIX = {mix!r}", "", "TILES = {"]
    order = {name: i for i, name in enumerate(COMPUTE_DTYPES)}
    for key in sorted(tiles, key=lambda k: (order[k[0]], k[1], float("inf") if k[2] is None else k[2])):
        entry = ", ".join(f"{k!r}: {tiles[key][k]!r}" for k in KERNELS)
        note = f"  # {notes[key]}" if notes.get(key) else ""
        lines.append(f"    {key!r}: {{{entry}}},{note}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _knob_block_n():
    """STELLAR_FACTORIZE_BLOCK_N (sets BLOCK_N of every kernel, for tuning), validated."""
    text = os.environ.get("STELLAR_FACTORIZE_BLOCK_N", "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in _POW2:
        raise ValueError(f"STELLAR_FACTORIZE_BLOCK_N must be a power of two in {_POW2[0]}..{_POW2[-1]}, got {text!r}")
    return value


def _mix_policy(dtype: torch.dtype) -> str:
    """How dots of an fp32 intermediate run for 16-bit inputs: the knob, else the table."""
    text = os.environ.get("STELLAR_FACTORIZE_MIX_PRECISION", "").strip()
    if text:
        if text not in MIX_CHOICES:
            raise ValueError(f"STELLAR_FACTORIZE_MIX_PRECISION must be one of {MIX_CHOICES}, got {text!r}")
        return text
    return factorize_tiles.MIX.get(str(dtype).replace("torch.", ""), "tf32")


def _precisions(dtype: torch.dtype) -> dict:
    """The dots' constexprs (see the module docstring): UPCAST, DOT_* for input x input dots,
    MIX_* for fp32-intermediate x input dots; *_ROUND emulates the GPU's operand rounding in the
    interpreter ("none" on the GPU, where input_precision does it)."""
    interpret = interpreting()
    if dtype == torch.float32:
        mode = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
        cast = False
    else:
        mode = _mix_policy(dtype)
        cast = mode == "input"
    if not interpret:
        prec = "ieee" if mode == "input" else mode
        dot_prec = mode if dtype == torch.float32 else "ieee"  # ignored for 16-bit operands
        return dict(UPCAST=False, DOT_ROUND="none", DOT_PREC=dot_prec,
                    MIX_CAST=cast, MIX_ROUND="none", MIX_PREC=prec)
    half = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "none")
    mix_round = {"input": half, "tf32": "tf32"}.get(mode, "none")
    dot_round = "tf32" if dtype == torch.float32 and mode == "tf32" else "none"
    return dict(UPCAST=True, DOT_ROUND=dot_round, DOT_PREC="ieee", MIX_CAST=False, MIX_ROUND=mix_round, MIX_PREC="ieee")


def plan(dtype: torch.dtype, R: int, D: int, DV: int) -> dict:
    """Tiles of every kernel for these sizes: {kernel: (BLOCK_N, BLOCK_C, num_warps, num_stages)},
    from the table (the BLOCK_N knob applied), plus "key" and "BLOCK_R"."""
    _check_table()
    key = table_key(dtype, R, D, DV)
    entry = factorize_tiles.TILES.get(key)
    if entry is None:
        raise ValueError(f"factorize_tiles.TILES has no entry for {key!r}")
    knob = _knob_block_n()
    tiles = {k: (knob or t[0],) + tuple(t[1:]) for k, t in entry.items()}
    return dict(tiles, key=key, BLOCK_R=key[1])


def _cols(block_c: int, width: int) -> int:
    """A column tile no wider than the (power-of-two padded) width, >= 16 for tl.dot."""
    return max(16, min(block_c, triton.next_power_of_2(width)))


def _run_options(tile: tuple) -> dict:
    return {} if interpreting() else dict(num_warps=tile[2], num_stages=tile[3])


def _smaller(tile: tuple):
    """The next tile to try: fewer pipeline stages, then fewer rows, then fewer columns."""
    block_n, block_c, warps, stages = tile
    if stages > 1:
        return (block_n, block_c, warps, stages - 1)
    if block_n > 16:
        return (block_n // 2, block_c, warps, stages)
    if block_c > 16:
        return (block_n, block_c // 2, warps, stages)
    return None


# (kernel, table key, requested tile) -> the tile that launched after a recoverable failure.
_FALLBACK: dict = {}


def _launch(kernel: str, key: tuple, tile: tuple, launch):
    """Call `launch(tile)`; on a recoverable failure warn and retry with a smaller tile."""
    asked = tile
    tile = _FALLBACK.get((kernel, key, asked), tile)
    while True:
        try:
            return launch(tile)
        except Exception as exc:  # noqa: BLE001  filtered by _recoverable, re-raised otherwise
            smaller = _smaller(tile) if recoverable_launch_failure(exc) else None
            if smaller is None:
                raise
            warnings.warn(
                f"stellar factorize: the {kernel} kernel failed to launch with tile {tile} for {key} "
                f"({type(exc).__name__}: {exc}); retrying with {smaller}", RuntimeWarning, stacklevel=4,
            )
            _FALLBACK[(kernel, key, asked)] = tile = smaller


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
    p = plan(dense.dtype, R, D, DV)
    prec = _precisions(dense.dtype)
    Z = torch.empty(B, N, DV, device=dev, dtype=dense.dtype)
    L = torch.empty(B, N, R, device=dev, dtype=dense.dtype) if return_L else torch.empty(0, device=dev, dtype=dense.dtype)
    logits = torch.empty(B, N, R, device=dev, dtype=torch.float32)
    inv_n = torch.empty(B, N, device=dev, dtype=torch.float32)
    inv_k = torch.empty(B, R, device=dev, dtype=torch.float32)
    prec_in = {k: prec[k] for k in ("UPCAST", "DOT_ROUND", "DOT_PREC")}
    prec_mix = {k: prec[k] for k in ("MIX_CAST", "MIX_ROUND", "MIX_PREC")}

    def launch(tile):
        _fwd_kernel[(triton.cdiv(N, tile[0]), B)](
            dense, sparse_q, sparse_v, Z, L, logits, inv_n, inv_k,
            N, R, D, DV,
            *dense.stride(), *sparse_q.stride(), *sparse_v.stride(),
            1.0 / temperature, eps,
            WRITE_L=return_L, **prec_in, **prec_mix,
            BLOCK_N=tile[0], BLOCK_R=p["BLOCK_R"], BLOCK_D=_cols(tile[1], D), BLOCK_DV=_cols(tile[1], DV),
            **_run_options(tile),
        )

    with device_guard(dev):
        _launch("fwd", p["key"], p["fwd"], launch)
    return Z, L, logits, inv_n, inv_k


def factorize_backward(
    dZ: Tensor, dL: Tensor | None, dense: Tensor, sparse_q: Tensor, sparse_v: Tensor,
    logits: Tensor, inv_n: Tensor, inv_k: Tensor, temperature: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward kernels (rows, then dense and values, then keys).

    Args:
        dZ: Tensor[B, N, Dv]; dL: Tensor[B, N, r] or None; the forward's inputs and its saved
        logits [B, N, r], inv_n [B, N], inv_k [B, r] (fp32).

    Returns:
        d_dense: Tensor[B, N, D], d_sparse_q: Tensor[B, r, D], d_sparse_v: Tensor[B, r, Dv], in
        the inputs' dtype.
    """
    B, N, D = dense.shape
    R, DV = sparse_v.shape[1], sparse_v.shape[2]
    dev, dtype = dense.device, dense.dtype
    p = plan(dtype, R, D, DV)
    prec = _precisions(dtype)
    mix = {k: prec[k] for k in ("MIX_CAST", "MIX_ROUND", "MIX_PREC")}
    has_dl = dL is not None
    dl_arg = dL if has_dl else logits  # any tensor; never read when HAS_DL is False
    dl_strides = dL.stride() if has_dl else (0, 0, 0)
    dc = torch.empty(B, N, R, device=dev, dtype=torch.float32)
    proj = torch.empty(B, N, device=dev, dtype=torch.float32)
    dk_hat = torch.empty(B, R, D, device=dev, dtype=torch.float32)
    d_dense = torch.empty(B, N, D, device=dev, dtype=dtype)
    d_sparse_q = torch.empty(B, R, D, device=dev, dtype=dtype)
    d_sparse_v = torch.empty(B, R, DV, device=dev, dtype=dtype)
    block_r = p["BLOCK_R"]

    def rows(tile):
        _bwd_rows_kernel[(triton.cdiv(N, tile[0]), B)](
            sparse_v, dZ, dl_arg, logits, inv_n, dc, proj,
            N, R, DV,
            *sparse_v.stride(), *dZ.stride(), *dl_strides,
            1.0 / temperature, eps,
            HAS_DL=has_dl, UPCAST=prec["UPCAST"], DOT_ROUND=prec["DOT_ROUND"], DOT_PREC=prec["DOT_PREC"],
            BLOCK_N=tile[0], BLOCK_R=block_r, BLOCK_DV=_cols(tile[1], DV), **_run_options(tile),
        )

    def dense_cols(tile):
        block_d = _cols(tile[1], D)
        _bwd_dense_kernel[(triton.cdiv(D, block_d), B)](
            dense, sparse_q, dc, proj, inv_n, inv_k, d_dense, dk_hat,
            N, R, D,
            *dense.stride(), *sparse_q.stride(),
            **mix,
            BLOCK_N=tile[0], BLOCK_R=block_r, BLOCK_D=block_d, **_run_options(tile),
        )

    def values(tile):
        block_dv = _cols(tile[1], DV)
        _bwd_values_kernel[(triton.cdiv(DV, block_dv), B)](
            dZ, logits, d_sparse_v,
            N, R, DV,
            *dZ.stride(),
            **mix,
            BLOCK_N=tile[0], BLOCK_R=block_r, BLOCK_DV=block_dv, **_run_options(tile),
        )

    with device_guard(dev):
        _launch("rows", p["key"], p["rows"], rows)
        _launch("dense", p["key"], p["dense"], dense_cols)
        _launch("values", p["key"], p["values"], values)
        _bwd_keys_kernel[(B,)](
            sparse_q, dk_hat, inv_k, d_sparse_q,
            R, D, *sparse_q.stride(), eps,
            BLOCK_R=block_r, BLOCK_D=_cols(min(64, 4096 // block_r), D), **_run_options((0, 0, 4, 2)),
        )
    return d_dense, d_sparse_q, d_sparse_v

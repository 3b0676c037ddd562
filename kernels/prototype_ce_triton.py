"""Fused Triton kernels for the prototype cross-entropy, and their launchers.

Tier 1 (private `@triton.jit` kernels) and tier 2 (launchers that pick block sizes, split the
grid and allocate outputs); the custom ops, their fake implementations and autograd live in
`stellar.kernels.prototype_ce`, which imports this module only when the Triton path runs.

With x = features [M, K], W = prototypes [C, K], t_m = targets[idx(m)] [C] and T = temperature:

    S_m    = x_m W^T / T                          [C]   logits, never written to memory
    lse_m  = log sum_c exp(S_mc)                        saved (fp32, as max and log-sum: 2 per row)
    s_m    = sum_c t_mc                                 saved (fp32, one per row)
    loss   = 1/M sum_m sum_c t_mc (lse_m - S_mc)
    dS_mc  = g/M (s_m softmax(S_m)_c - t_mc)            g: the loss's upstream gradient
    dx     = dS W / T        dW = dS^T x / T

(s_m is 1 for targets whose rows sum to one; keeping it makes unnormalised rows exact, and the
rows of dS sum to zero for any targets, as the loss ignores a shift of a row's logits.)

Forward, `_fwd_kernel`: one program per (tile of BLOCK_M rows, range of prototypes). It streams
the prototypes in blocks of BLOCK_C, computes the [BLOCK_M, BLOCK_C] logits with `tl.dot` (fp32
accumulation), and keeps per row, in fp32 and base 2, the running max, the sum of exponentials
below it, the target-weighted logit sum and the target sum. The launcher takes the target-weighted
sum relative to the overall max (tsum * max) before anything else, so the loss,
sum_c t_c (lse - S_c), adds small numbers (as log_softmax does) and loses ~eps |max| per row to
that one cancellation. (The kernel cannot carry it relative to the running max: see the loop for
the Triton pass that miscompiled that on the H200.) The target rows are gathered by index inside
the kernel. Each program writes four fp32 numbers per row; with more than one range of
prototypes per row tile (few rows: M = 2048 gives only 16 tiles of 128), the launcher merges
the ranges onto the overall max, on [splits, M] tensors.

Backward: the logits are recomputed block by block from the saved log-sum-exp (nothing of size
[M, C] exists). dx needs a sum over C and dW a sum over M; one pass over the (M, C) tile grid
could own only one of the two sums, and the other would be written as partials, one [BLOCK_C, K]
(or [BLOCK_M, K]) fp32 slab per tile: M C K / BLOCK * 4 bytes, 2.1 GB written and read again at
M = C = 16384, K = 256, BLOCK = 128 (or as many fp32 atomics). A second pass instead costs one
more read of the targets (M C * 4 bytes = 1.07 GB in fp32, half in bf16) and one more logits
matmul (2 M K C flops) and writes nothing extra. So the backward is two kernels, each owning its
sum in registers and writing its gradient once:
    `_bwd_dx_kernel`: per (row tile, range of prototypes, K chunk); loops over the prototypes
        (2 matmuls per block: the logits, then dS @ W).
    `_bwd_dw_kernel`: per (prototype block, range of rows, K chunk); loops over the rows
        (2 matmuls per block: the logits, transposed, then dS^T @ x).
Ranges (splits) exist only to fill the GPU when one side is small; their fp32 partials
([splits, M, K] or [splits, C, K]) are summed by the launcher.

Precision: products run on the input dtype with fp32 accumulation (tensor cores for 16-bit
inputs); softmax, log-sum-exp and the target sums in fp32. dS goes into its product in the
input dtype as (s_m p - t) (for normalised targets, values in [-1, 1]); the factor g / (M T) is
applied to the fp32 accumulator afterwards, so it does not push fp16 values into underflow.
float32 inputs follow torch's own float32 matmuls on CUDA: exact fp32 products ("ieee", on FMA
units) when `torch.get_float32_matmul_precision()` is "highest" (the default), TF32 tensor cores
when it is "high" or "medium". In the interpreter (TRITON_INTERPRET=1, CPU tensors) `tl.dot` on
16-bit operands is wrong, so UPCAST makes every dot take fp32 operands there.

K: for 16-bit inputs up to K = 256 (padded to a power of two) the row tile of x (or the block
of W) is loaded once per program and each block's logits are one `tl.dot` (SINGLE_K); otherwise
the logits loop over K in chunks of BLOCK_K, and each program produces one chunk of at most 256
gradient columns (BLOCK_N; grid axis 2, so K > 256 recomputes the logits once per chunk).
"""
from __future__ import annotations

import math
import os
import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._dispatch import device_guard, interpreting, recoverable_launch_failure

MAX_BLOCK_K = 256  # widest K chunk: one 16-bit logits product, and the gradient columns of one program

# ----------------------------------------------------------------------------- tier 1: kernels


@triton.jit
def _logits_tile(
    x_tile, X, W, rows, cols, mask_m, mask_c, K,
    stride_xm, stride_xk, stride_wc, stride_wk,
    SINGLE_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """x[rows] @ W[cols]^T as fp32 [BLOCK_M, BLOCK_C]. With SINGLE_K, x_tile is the whole
    [BLOCK_M, BLOCK_K] row tile (loaded once by the caller) and one dot does it."""
    offs_k = tl.arange(0, BLOCK_K)
    if SINGLE_K:
        w = tl.load(W + cols[:, None] * stride_wc + offs_k[None, :] * stride_wk,
                    mask=mask_c[:, None] & (offs_k[None, :] < K), other=0.0)
        if UPCAST:
            acc = tl.dot(x_tile.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision=PRECISION)
        else:
            acc = tl.dot(x_tile, tl.trans(w), input_precision=PRECISION)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < K
            x = tl.load(X + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(W + cols[:, None] * stride_wc + kk[None, :] * stride_wk,
                        mask=mask_c[:, None] & mask_k[None, :], other=0.0)
            if UPCAST:
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _target_rows(IDX, rows, mask_m, T, stride_i, HAS_INDEX: tl.constexpr):
    """The target row of each row (gathered by index) and whether it may be read: rows past M
    and target rows outside [0, T) read nothing (the public function checks the index range
    and T == M without an index; this guards direct calls of the op)."""
    if HAS_INDEX:
        trow = tl.load(IDX + rows * stride_i, mask=mask_m, other=0).to(tl.int64)
    else:
        trow = rows
    return trow, mask_m & (trow >= 0) & (trow < T)


@triton.jit
def _fwd_kernel(
    X, W, TGT, IDX, PART,
    M, C, K, T,
    stride_xm, stride_xk, stride_wc, stride_wk, stride_tt, stride_tc, stride_i,
    inv_temperature, c_per_split,
    HAS_INDEX: tl.constexpr, SINGLE_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < M
    rows = rows.to(tl.int64)
    trow, t_ok = _target_rows(IDX, rows, mask_m, T, stride_i, HAS_INDEX)
    t_base = TGT + trow * stride_tt

    offs_k = tl.arange(0, BLOCK_K)
    x_tile = tl.zeros([BLOCK_M, BLOCK_K], dtype=X.dtype.element_ty)
    if SINGLE_K:
        x_tile = tl.load(X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)

    # Base-2 logits (exp2); per row: running max m, sum of exp2(s - m), <t, s - m>, sum of t.
    scale2 = inv_temperature * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    tdot = tl.zeros([BLOCK_M], dtype=tl.float32)
    tsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    c_start = split * c_per_split
    c_end = tl.minimum(c_start + c_per_split, C)
    for c0 in range(c_start, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask_c = cols < c_end
        acc = _logits_tile(x_tile, X, W, rows, cols, mask_m, mask_c, K,
                           stride_xm, stride_xk, stride_wc, stride_wk,
                           SINGLE_K, UPCAST, PRECISION, BLOCK_M, BLOCK_C, BLOCK_K)
        s2 = acc * scale2
        m_new = tl.maximum(m_i, tl.max(tl.where(mask_c[None, :], s2, float("-inf")), axis=1))
        shift = tl.where(m_i > float("-inf"), m_i - m_new, 0.0)  # <= 0; 0 on the first block
        p = tl.where(mask_c[None, :], tl.exp2(s2 - m_new[:, None]), 0.0)
        l_i = l_i * tl.exp2(shift) + tl.sum(p, axis=1)
        t = tl.load(t_base[:, None] + cols[None, :] * stride_tc, mask=t_ok[:, None] & mask_c[None, :],
                    other=0.0).to(tl.float32)
        # <t, s> itself (base 2), made relative to the max by the launcher. Triton turns a loop's
        # `acc += tl.sum(x, axis=1)` into thread-local partial sums reduced after the loop
        # (TritonGPUOptimizeThreadLocality): such an accumulator must not be read inside the loop
        # nor used twice after it. Carrying <t, s - running max> (tdot + tsum * shift + ...) read
        # tsum inside the loop: on the H200 (triton 3.6) the loss came out 6% low at C 16384, and
        # the sm_90 TTGIR (triton 3.8) shows why: tsum * shift became shift * (tsum's initial
        # zeros). The interpreter, and one block per program, were right. `tdot - tsum * m_i`
        # here fails to compile (assertion loopResult.hasOneUse()). CI checks the source for
        # such reads: kernel_report.thread_local_hazards.
        tdot += tl.sum(t * s2, axis=1)
        tsum += tl.sum(t, axis=1)
        m_i = m_new

    out = PART + split * 4 * M + rows
    tl.store(out, m_i, mask=mask_m)
    tl.store(out + M, tl.log2(l_i), mask=mask_m)
    tl.store(out + 2 * M, tdot, mask=mask_m)
    tl.store(out + 3 * M, tsum, mask=mask_m)


@triton.jit
def _grad_logits(acc, TGT, t_base, cols, row_max, log_sum, tsum, t_ok, mask_m, mask_c, scale2, stride_tc):
    """(s_m softmax - t) for one [BLOCK_M, BLOCK_C] block of recomputed logits, 0 outside. The
    softmax is exp2((s - max) - log2 sum): the large terms cancel first (see the forward)."""
    p = tl.exp2((acc * scale2 - row_max[:, None]) - log_sum[:, None])
    t = tl.load(t_base[:, None] + cols[None, :] * stride_tc, mask=t_ok[:, None] & mask_c[None, :],
                other=0.0).to(tl.float32)
    return tl.where(mask_m[:, None] & mask_c[None, :], tsum[:, None] * p - t, 0.0)


@triton.jit
def _bwd_dx_kernel(
    X, W, TGT, IDX, STATS, GRAD, DX,
    M, C, K, T,
    stride_xm, stride_xk, stride_wc, stride_wk, stride_tt, stride_tc, stride_i,
    inv_temperature, inv_m, c_per_split,
    HAS_INDEX: tl.constexpr, SINGLE_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    pid_n = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < M
    rows = rows.to(tl.int64)
    trow, t_ok = _target_rows(IDX, rows, mask_m, T, stride_i, HAS_INDEX)
    t_base = TGT + trow * stride_tt
    row_max = tl.load(STATS + rows, mask=mask_m, other=0.0)
    log_sum = tl.load(STATS + M + rows, mask=mask_m, other=0.0)
    tsum = tl.load(STATS + 2 * M + rows, mask=mask_m, other=0.0)
    scale2 = inv_temperature * 1.4426950408889634

    nn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's chunk of dx's columns
    mask_n = nn < K
    x_tile = tl.zeros([BLOCK_M, BLOCK_K], dtype=X.dtype.element_ty)
    if SINGLE_K:  # BLOCK_N == BLOCK_K covers K: the row tile is loaded once
        x_tile = tl.load(X + rows[:, None] * stride_xm + nn[None, :] * stride_xk,
                         mask=mask_m[:, None] & mask_n[None, :], other=0.0)

    acc_dx = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    c_start = split * c_per_split
    c_end = tl.minimum(c_start + c_per_split, C)
    for c0 in range(c_start, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask_c = cols < c_end
        acc = _logits_tile(x_tile, X, W, rows, cols, mask_m, mask_c, K,
                           stride_xm, stride_xk, stride_wc, stride_wk,
                           SINGLE_K, UPCAST, PRECISION, BLOCK_M, BLOCK_C, BLOCK_K)
        d = _grad_logits(acc, TGT, t_base, cols, row_max, log_sum, tsum, t_ok, mask_m, mask_c, scale2, stride_tc)
        w = tl.load(W + cols[:, None] * stride_wc + nn[None, :] * stride_wk,
                    mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            acc_dx = tl.dot(d, w.to(tl.float32), acc_dx, input_precision=PRECISION)
        else:
            acc_dx = tl.dot(d.to(w.dtype), w, acc_dx, input_precision=PRECISION)

    coef = tl.load(GRAD).to(tl.float32) * inv_m * inv_temperature
    out = DX + split * M * K + rows[:, None] * K + nn[None, :]
    tl.store(out, (acc_dx * coef).to(DX.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _bwd_dw_kernel(
    X, W, TGT, IDX, STATS, GRAD, DW,
    M, C, K, T,
    stride_xm, stride_xk, stride_wc, stride_wk, stride_tt, stride_tc, stride_i,
    inv_temperature, inv_m, m_per_split,
    HAS_INDEX: tl.constexpr, SINGLE_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    pid_n = tl.program_id(2)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    cols = cols.to(tl.int64)
    scale2 = inv_temperature * 1.4426950408889634

    nn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's chunk of dW's columns
    mask_n = nn < K
    w_tile = tl.zeros([BLOCK_C, BLOCK_K], dtype=W.dtype.element_ty)
    if SINGLE_K:  # BLOCK_N == BLOCK_K covers K: the prototype block is loaded once
        w_tile = tl.load(W + cols[:, None] * stride_wc + nn[None, :] * stride_wk,
                         mask=mask_c[:, None] & mask_n[None, :], other=0.0)

    acc_dw = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
    m_start = split * m_per_split
    m_end = tl.minimum(m_start + m_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask_m = rows < m_end
        rows = rows.to(tl.int64)
        trow, t_ok = _target_rows(IDX, rows, mask_m, T, stride_i, HAS_INDEX)
        t_base = TGT + trow * stride_tt
        row_max = tl.load(STATS + rows, mask=mask_m, other=0.0)
        log_sum = tl.load(STATS + M + rows, mask=mask_m, other=0.0)
        tsum = tl.load(STATS + 2 * M + rows, mask=mask_m, other=0.0)
        x = tl.load(X + rows[:, None] * stride_xm + nn[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        if SINGLE_K:
            if UPCAST:
                acc = tl.dot(x.to(tl.float32), tl.trans(w_tile.to(tl.float32)), input_precision=PRECISION)
            else:
                acc = tl.dot(x, tl.trans(w_tile), input_precision=PRECISION)
        else:
            acc = _logits_tile(x, X, W, rows, cols, mask_m, mask_c, K,
                               stride_xm, stride_xk, stride_wc, stride_wk,
                               SINGLE_K, UPCAST, PRECISION, BLOCK_M, BLOCK_C, BLOCK_K)
        d = _grad_logits(acc, TGT, t_base, cols, row_max, log_sum, tsum, t_ok, mask_m, mask_c, scale2, stride_tc)
        if UPCAST:
            acc_dw = tl.dot(tl.trans(d), x.to(tl.float32), acc_dw, input_precision=PRECISION)
        else:
            acc_dw = tl.dot(tl.trans(d.to(x.dtype)), x, acc_dw, input_precision=PRECISION)

    coef = tl.load(GRAD).to(tl.float32) * inv_m * inv_temperature
    out = DW + split * C * K + cols[:, None] * K + nn[None, :]
    tl.store(out, (acc_dw * coef).to(DW.dtype.element_ty), mask=mask_c[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------- tier 2: launchers


def _target_programs(device: torch.device) -> int:
    """How many programs a launch should have to fill the device: two per SM on a GPU. In the
    interpreter a small number, so that the tests' small shapes exercise the split paths; for
    CPU tensors outside it (benchmarks/kernel_report.py compiles our launches without a GPU),
    an H100 / H200's 132 SMs."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4 if interpreting() else 2 * 132


def _precision(dtype: torch.dtype) -> str:
    if interpreting() or dtype != torch.float32:
        return "ieee"  # 16-bit operands: the input precision does not apply
    # As torch's own float32 matmuls on CUDA: exact unless TF32 is allowed ("high" or "medium").
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _p2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


def _config(kind: str, M: int, C: int, K: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options per kernel ("fwd", "bwd_dx", "bwd_dw"), chosen by reasoning
    and checked to compile without register spills for sm_90 (benchmarks/kernel_report.py), not
    yet tuned on a GPU:
      BLOCK_K  the K chunk of each logits product: all of K up to 256 for 16-bit inputs (then
               the row tile, or the prototype block, is loaded once per program: SINGLE_K),
               64 beyond; 64 for float32 with TF32, 16 for exact "ieee" products (they run on
               FMA units, which hold whole BLOCK_K-long operands per thread).
      BLOCK_N  the K chunk of the gradient a program accumulates, [64, BLOCK_N] fp32 (<= 256).
      BLOCK_M, BLOCK_C  the row tile and the prototype block (>= 16 for `tl.dot`).
    STELLAR_PROTOTYPE_CE_BLOCK_M / STELLAR_PROTOTYPE_CE_BLOCK_C override the last two."""
    interpret = interpreting()
    precision = _precision(dtype)
    fma = dtype == torch.float32 and precision == "ieee" and not interpret  # exact fp32: no tensor cores
    block_n = min(_p2(K), MAX_BLOCK_K)
    if dtype == torch.float32:
        k_cap = 16 if fma else 64
    else:  # all of K in one product when it fits; otherwise 64-wide chunks (256 would spill)
        k_cap = MAX_BLOCK_K if _p2(K) <= MAX_BLOCK_K else 64
    if interpret:
        bm, bc, warps, stages = 128, 256, 4, 1  # big tiles: the interpreter pays per program and step
    elif kind == "fwd":
        bm, bc, warps, stages = (64 if dtype == torch.float32 else 128), (32 if fma else 64), 8, 3
    else:  # the gradient kernels hold a [64, BLOCK_N] fp32 accumulator
        bm, bc, warps, stages = 64, (32 if dtype == torch.float32 else 64), 8, 2
    if kind != "fwd" and block_n <= 128 and dtype != torch.float32 and not interpret:
        bc *= 2  # narrow K: room for wider prototype blocks
    bm = _block_knob("STELLAR_PROTOTYPE_CE_BLOCK_M", bm)
    bc = _block_knob("STELLAR_PROTOTYPE_CE_BLOCK_C", bc)
    if interpret:  # small shapes, small tiles; on a GPU the tiles stay fixed (fewer compiled variants)
        bm, bc = min(bm, _p2(M)), min(bc, _p2(C))
    cfg = dict(BLOCK_M=bm, BLOCK_C=bc, BLOCK_K=min(k_cap, _p2(K)),
               SINGLE_K=_p2(K) <= k_cap, UPCAST=interpret, PRECISION=precision)
    if kind != "fwd":
        cfg["BLOCK_N"] = block_n
    if not interpret:
        cfg.update(num_warps=warps, num_stages=stages)
    return cfg


def _block_knob(name: str, default: int) -> int:
    """A block-size knob from the environment: a power of two in 16..256 (ValueError naming it)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    value = int(text) if text.isdigit() else None
    if value not in (16, 32, 64, 128, 256):
        raise ValueError(f"{name} must be a power of two in 16..256, got {text!r}")
    return value


def _split(n_tiles_other: int, n_blocks: int, block: int, programs: int) -> tuple[int, int]:
    """Split a loop of n_blocks blocks into ranges so that n_tiles_other * splits reaches
    `programs`; returns (splits, elements per split), no split empty."""
    want = max(1, min(n_blocks, -(-programs // max(1, n_tiles_other))))
    per = -(-n_blocks // want)
    return -(-n_blocks // per), per * block


def _index_args(target_index: Tensor | None, targets: Tensor):
    if target_index is None:
        return targets, 0, False  # any tensor: never read when HAS_INDEX is False
    return target_index, target_index.stride(0), True


# Per (kernel, dtype, K chunk): caps on num_stages / BLOCK_C / BLOCK_M that a launch needed
# after raising OutOfResources (another Triton version or GPU may need smaller tiles).
_CAPS: dict = {}
_SHRINK = ("num_stages", "BLOCK_C", "BLOCK_M")  # in this order


def _launch_with_fallback(kind: str, M: int, C: int, K: int, dtype: torch.dtype, launch):
    """Call `launch(cfg)`; on a launch failure a smaller tile can fix (out of shared memory or
    registers) warn and retry with fewer pipeline stages, then half the prototype block, then half
    the row tile (down to 16), and remember the caps that worked."""
    key = (kind, dtype, min(_p2(K), MAX_BLOCK_K))
    cfg = _config(kind, M, C, K, dtype)
    for name, cap in _CAPS.get(key, {}).items():
        if name in cfg:
            cfg[name] = min(cfg[name], cap)
    while True:
        try:
            return launch(dict(cfg))
        except Exception as exc:  # noqa: BLE001  filtered by recoverable_launch_failure, re-raised otherwise
            name = None
            if recoverable_launch_failure(exc):
                name = next((n for n in _SHRINK if cfg.get(n, 0) > (1 if n == "num_stages" else 16)), None)
            if name is None:
                raise
            old = cfg[name]
            cfg[name] = old - 1 if name == "num_stages" else old // 2
            _CAPS.setdefault(key, {})[name] = cfg[name]
            warnings.warn(f"stellar prototype_cross_entropy: the {kind} kernel failed to launch with {name}={old} "
                          f"({type(exc).__name__}: {exc}); retrying with {name}={cfg[name]}", RuntimeWarning, stacklevel=4)


def prototype_ce_forward(
    features: Tensor, prototypes: Tensor, targets: Tensor, target_index: Tensor | None, temperature: float
) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel (inputs already checked: same device, features and prototypes
    of one dtype, T == M without an index).

    Args:
        features: Tensor[M, K]; prototypes: Tensor[C, K]; targets: Tensor[T, C] (any float
        dtype, read as fp32); target_index: integer Tensor[M] with values in [0, T), or None;
        any strides.

    Returns:
        loss: float32 scalar; stats: float32 Tensor[3, M], per row the max of the base-2 logits
        S log2(e), log2 of the sum of exp2(S log2(e) - max) (so lse = ln2 (max + that)), and the
        target sum. The log-sum-exp is kept in two parts: in fp32, max + log2(sum) would round to
        the logits' magnitude (~1e-6 at 16), which softmax = exp(S - lse) turns into a relative
        error of the probabilities and, where they match the targets, of softmax - target.
    """
    M, K = features.shape
    C, T = prototypes.shape[0], targets.shape[0]
    dev = features.device
    index, stride_i, has_index = _index_args(target_index, targets)

    def launch(cfg):
        n_m = triton.cdiv(M, cfg["BLOCK_M"])
        splits, c_per_split = _split(n_m, triton.cdiv(C, cfg["BLOCK_C"]), cfg["BLOCK_C"], _target_programs(dev))
        part = torch.empty(splits, 4, M, device=dev, dtype=torch.float32)  # max, log2 sum, <t, s>, sum t
        _fwd_kernel[(n_m, splits)](
            features, prototypes, targets, index, part,
            M, C, K, T,
            *features.stride(), *prototypes.stride(), *targets.stride(), stride_i,
            1.0 / temperature, c_per_split,
            HAS_INDEX=has_index, **cfg,
        )
        return part

    with device_guard(dev):
        part = _launch_with_fallback("fwd", M, C, K, features.dtype, launch)
    row_max, log_sum, tdot, tsum = part.unbind(1)  # each [splits, M]; tdot = <t, s> (base 2)
    if part.shape[0] > 1:  # merge the prototype ranges onto the overall max
        overall = row_max.amax(0)
        log_sum = torch.log2(torch.exp2(log_sum + (row_max - overall)).sum(0))
        row_max, tdot, tsum = overall, tdot.sum(0), tsum.sum(0)
    else:
        row_max, log_sum, tdot, tsum = row_max[0], log_sum[0], tdot[0], tsum[0]
    # loss_m = sum_c t_c (lse - S_c) = ln2 (tsum log2(sum) - <t, s - max>): the large terms
    # (max, ~|s|) cancel in fp32 before the small ones are added (error ~eps |max| per row)
    loss = (tsum * log_sum - (tdot - tsum * row_max)).sum() * (math.log(2.0) / M)
    return loss, torch.stack([row_max, log_sum, tsum])


def prototype_ce_backward(
    grad: Tensor, features: Tensor, prototypes: Tensor, targets: Tensor, target_index: Tensor | None,
    stats: Tensor, temperature: float, need_features: bool = True, need_prototypes: bool = True,
) -> tuple[Tensor, Tensor]:
    """Launch the backward kernels (one per gradient asked for).

    Args:
        grad: the loss's upstream gradient (a scalar tensor, read on the device: no sync); the
        forward's inputs; its saved stats (float32 Tensor[3, M]); which gradients to compute.

    Returns:
        d_features: Tensor[M, K] and d_prototypes: Tensor[C, K] in the inputs' dtype (an empty
        Tensor[0] for a gradient not asked for).
    """
    M, K = features.shape
    C, T = prototypes.shape[0], targets.shape[0]
    dev, dtype = features.device, features.dtype
    index, stride_i, has_index = _index_args(target_index, targets)
    grad = grad.reshape(1)
    programs = _target_programs(dev)
    common = (M, C, K, T, *features.stride(), *prototypes.stride(), *targets.stride(), stride_i,
              1.0 / temperature, 1.0 / M)
    d_features = torch.empty(M, K, device=dev, dtype=dtype) if need_features else features.new_empty(0)
    d_prototypes = torch.empty(C, K, device=dev, dtype=prototypes.dtype) if need_prototypes else prototypes.new_empty(0)

    def launch_dx(cfg):
        n_m, n_k = triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_N"])
        splits, c_per_split = _split(n_m * n_k, triton.cdiv(C, cfg["BLOCK_C"]), cfg["BLOCK_C"], programs)
        out = d_features if splits == 1 else torch.empty(splits, M, K, device=dev, dtype=torch.float32)
        _bwd_dx_kernel[(n_m, splits, n_k)](
            features, prototypes, targets, index, stats, grad, out, *common, c_per_split,
            HAS_INDEX=has_index, **cfg,
        )
        if splits > 1:  # sum the prototype ranges' fp32 partials
            d_features.copy_(out.sum(0))

    def launch_dw(cfg):
        n_c, n_k = triton.cdiv(C, cfg["BLOCK_C"]), triton.cdiv(K, cfg["BLOCK_N"])
        splits, m_per_split = _split(n_c * n_k, triton.cdiv(M, cfg["BLOCK_M"]), cfg["BLOCK_M"], programs)
        out = d_prototypes if splits == 1 else torch.empty(splits, C, K, device=dev, dtype=torch.float32)
        _bwd_dw_kernel[(n_c, splits, n_k)](
            features, prototypes, targets, index, stats, grad, out, *common, m_per_split,
            HAS_INDEX=has_index, **cfg,
        )
        if splits > 1:  # sum the row ranges' fp32 partials
            d_prototypes.copy_(out.sum(0))

    with device_guard(dev):
        if need_features:
            _launch_with_fallback("bwd_dx", M, C, K, dtype, launch_dx)
        if need_prototypes:
            _launch_with_fallback("bwd_dw", M, C, K, dtype, launch_dw)
    return d_features, d_prototypes


def flops(M: int, C: int, K: int) -> dict:
    """Matrix-product flops of forward + backward: the useful 3 x 2MKC (logits, dx, dW) and what
    the kernels execute (forward 1 product, each backward kernel 2: the logits are recomputed)."""
    return {"useful": 3 * 2 * M * K * C, "executed": 5 * 2 * M * K * C}


# ----------------------------------------------------------------------------- compile report


def compile_report_cases(which: str) -> list:
    """Cases for benchmarks/kernel_report.py (it compiles every launch of `case.call(module)` for
    sm_90 on empty CPU tensors and counts registers and spills). production: forward and both
    gradients at the model's shapes, M 16384 (T 2048, indexed: mask_loss) and M 2048 (no index:
    clustering_loss), K 256, C 16384 and 65536, in bf16, fp16 and fp32 (TF32 and exact); then
    K 64 and K 300 (two gradient chunks), not production (spills reported, not failed).
    ci: bf16 and exact fp32 at M 16384, C 16384 (the distinct binaries but fp16 and TF32)."""
    from types import SimpleNamespace

    dtypes = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False),
              "fp32-tf32": (torch.float32, True), "fp32-ieee": (torch.float32, False)}

    def case(M, T, C, K, name, production=True):
        dtype, tf32 = dtypes[name]

        def call(mod):
            x, w = torch.empty(M, K, dtype=dtype), torch.empty(C, K, dtype=dtype)
            targets = torch.empty(M if T is None else T, C)
            index = None if T is None else torch.empty(M, dtype=torch.int64)
            was = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                mod.prototype_ce_forward(x, w, targets, index, 0.12)
                mod.prototype_ce_backward(torch.empty(()), x, w, targets, index, torch.empty(3, M), 0.12)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = was

        shape = f"M{M} K{K} C{C}" + (f" T{T} indexed" if T is not None else "")
        return SimpleNamespace(shape=shape, dtype=name, call=call, production=production)

    rows = [(16384, 2048), (2048, None)]
    if which == "ci":
        return [case(16384, 2048, 16384, 256, name) for name in ("bf16", "fp32-ieee")]
    if which != "production":
        raise ValueError(f"unknown case set {which!r} (production, ci)")
    cases = [case(M, T, C, 256, name) for name in dtypes for M, T in rows for C in (16384, 65536)]
    cases += [case(16384, 2048, 16384, K, name, production=False) for K in (64, 300) for name in ("bf16", "fp32-ieee")]
    return cases


"""Factorization microbenchmarks: eager reference vs torch.compile vs the fused Triton kernels.

    pytest benchmarks/bench_factorization.py --benchmark-only -s        # CUDA: the full grid
    python benchmarks/bench_factorization.py RESULTS.json               # table from --benchmark-json
    python benchmarks/bench_factorization.py check                      # Triton vs float64, on CUDA
    python benchmarks/bench_factorization.py run OUT.json               # timings without pytest-benchmark

Shapes (bf16, r 16): B 128 / 1024, N 196, D 768 (ViT-B/16) and B 128, N 256, D 1280 (ViT-H/14);
forward and forward+backward (gradients of dense, sparse_q and sparse_v from dZ). Each timed call
synchronizes the device before it returns. Achieved GB/s count the fewest bytes the op must move
(../shared/PERF.md "The floor"): forward reads dense and writes Z and L; forward+backward also
reads dZ and dense again and writes d_dense. A device-to-device copy is timed in the same run
and every case reports the fraction of its bandwidth. The fused projection (`out_proj`, the
decoder's Linear(768 -> 512) applied at rank r) is set against Linear applied to Z.

Without CUDA everything skips, unless STELLAR_BENCH_INTERPRET=1 (with TRITON_INTERPRET=1) asks for
one tiny interpreter-mode size to check that the benchmark itself runs; its times mean nothing.
"""
from __future__ import annotations

import json
import os
import statistics
import sys

import time

import torch

try:
    import pytest
except ImportError:  # the `check` and `run` modes below need only torch (a bare GPU machine)
    pytest = None

from stellar.kernels import factorize, reference

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
TINY = not CUDA and os.environ.get("STELLAR_BENCH_INTERPRET") == "1" and os.environ.get("TRITON_INTERPRET") == "1"
if pytest is not None:
    pytestmark = pytest.mark.skipif(
        not (CUDA or TINY),
        reason="factorization benchmarks need CUDA (or STELLAR_BENCH_INTERPRET=1 TRITON_INTERPRET=1 for a tiny CPU check)",
    )
    fixture, parametrize = pytest.fixture, pytest.mark.parametrize
else:
    def fixture(**_):
        return lambda fn: fn

    def parametrize(*_, **__):
        return lambda fn: fn
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
R = 16
SHAPES = {"B128-N196-D768": (128, 196, 768), "B1024-N196-D768": (1024, 196, 768), "B128-N256-D1280": (128, 256, 1280)}
if TINY:
    SHAPES = {"B2-N13-D40": (2, 13, 40)}
IMPLS = ("eager", "compile", "triton") if CUDA else ("eager", "triton")
L2_ROTATE_BYTES = 256 << 20  # rotate input sets until they exceed the L2 several times over


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _floor_bytes(B, N, D, r, mode):
    item = torch.finfo(DTYPE).bits // 8
    fwd = item * (B * N * D * 2 + B * N * r + 2 * B * r * D)  # read dense, write Z and L, read S
    return fwd if mode == "fwd" else fwd + item * B * N * D * 3  # + read dZ, dense; write d_dense


@fixture(scope="module")
def copy_bandwidth():
    return measure_copy_bandwidth()


def measure_copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of 20, CUDA events)."""
    if not CUDA:
        return float("nan")
    src = torch.randn(1 << 28, device=DEVICE, dtype=DTYPE)  # 512 MiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def _input_sets(B, N, D, r, requires_grad):
    one = B * N * D * torch.finfo(DTYPE).bits // 8
    count = max(1, min(8, -(-L2_ROTATE_BYTES // one))) if CUDA else 1
    g = torch.Generator(device=DEVICE).manual_seed(0)
    sets = []
    for _ in range(count):
        dense = torch.randn(B, N, D, device=DEVICE, dtype=DTYPE, generator=g)
        sparse = torch.randn(B, r, D, device=DEVICE, dtype=DTYPE, generator=g)
        sparse_q = torch.randn(B, r, D, device=DEVICE, dtype=DTYPE, generator=g)
        dZ = torch.randn(B, N, D, device=DEVICE, dtype=DTYPE, generator=g)
        sets.append([t.requires_grad_(requires_grad) for t in (dense, sparse_q, sparse)] + [dZ])
    return sets


def _op(impl):
    if impl == "triton":
        return lambda x, q, v: factorize(x, q, v, backend="triton")
    if impl == "eager":
        return lambda x, q, v: reference.factorize(x, q, v, 0.06, 1e-7)
    torch._dynamo.reset()  # one compiled code object serves every case: keep under the recompile limit
    return torch.compile(lambda x, q, v: reference.factorize(x, q, v, 0.06, 1e-7))


def _run(benchmark, fn, sets, bytes_moved, bandwidth):
    state = {"i": 0}

    def call():
        args = sets[state["i"] % len(sets)]
        state["i"] += 1
        fn(*args)
        _sync()

    for _ in range(5):  # warm-up: compilation, autotuning, caches
        call()
    benchmark.pedantic(call, rounds=50 if CUDA else 2, iterations=1, warmup_rounds=2)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        gbps=bytes_moved / seconds / 1e9, copy_gbps=bandwidth / 1e9, copy_fraction=bytes_moved / seconds / bandwidth
    )


@parametrize("shape", list(SHAPES))
@parametrize("impl", IMPLS)
@parametrize("mode", ["fwd", "fwdbwd"])
def test_factorize(benchmark, copy_bandwidth, shape, impl, mode):
    B, N, D = SHAPES[shape]
    benchmark.group = f"factorize {mode} {shape}"
    op = _op(impl)
    if mode == "fwd":
        sets = _input_sets(B, N, D, R, requires_grad=False)

        def fn(x, q, v, dZ):
            with torch.no_grad():
                op(x, q, v)
    else:
        sets = _input_sets(B, N, D, R, requires_grad=True)

        def fn(x, q, v, dZ):
            Z, _ = op(x, q, v)
            torch.autograd.grad(Z, (x, q, v), dZ)

    _run(benchmark, fn, sets, _floor_bytes(B, N, D, R, mode), copy_bandwidth)


@parametrize("fused", [False, True], ids=["linear_of_Z", "out_proj"])
def test_decoder_projection(benchmark, copy_bandwidth, fused):
    """Linear(D -> 512) of Z vs the same applied to the r tokens before mixing, fwd+bwd."""
    B, N, D = next(iter(SHAPES.values()))
    out = 512 if CUDA else 24
    benchmark.group = f"decoder projection fwdbwd B{B}-N{N}-D{D} -> {out}"
    linear = torch.nn.Linear(D, out, device=DEVICE, dtype=DTYPE)
    sets = _input_sets(B, N, D, R, requires_grad=True)
    sets = [s[:3] + [torch.randn(B, N, out, device=DEVICE, dtype=DTYPE)] for s in sets]
    params = (linear.weight, linear.bias)

    def fn(x, q, v, dY):
        if fused:
            Y, _ = factorize(x, q, v, backend="triton", return_L=False, out_proj=linear)
        else:
            Y = linear(factorize(x, q, v, backend="triton", return_L=False)[0])
        torch.autograd.grad(Y, (x, q, v, *params), dY)

    item = torch.finfo(DTYPE).bits // 8
    _run(benchmark, fn, sets, item * B * N * (3 * D + 2 * out), copy_bandwidth)


def summarize(path: str) -> str:
    """A short table (median ms, GB/s, fraction of copy, speed-up over eager) from --benchmark-json."""
    data = json.load(open(path))
    rows, eager = [], {}
    for bench in data["benchmarks"]:
        if bench["name"].startswith("test_factorize") and bench["params"]["impl"] == "eager":
            eager[bench["group"]] = bench["stats"]["median"]
    lines = [f"{'case':58s} {'ms':>8s} {'GB/s':>8s} {'copy%':>6s} {'vs eager':>8s}"]
    for bench in sorted(data["benchmarks"], key=lambda b: (b["group"], b["name"])):
        median, info = bench["stats"]["median"], bench["extra_info"]
        base = eager.get(bench["group"])
        speedup = f"{base / median:7.2f}x" if base else ""
        name = f"{bench['group']} {bench['params'].get('impl', bench['name'].split('[')[-1].rstrip(']'))}"
        lines.append(f"{name:58s} {median * 1e3:8.3f} {info['gbps']:8.0f} {100 * info['copy_fraction']:5.0f}% {speedup:>8s}")
    copy = next((b["extra_info"]["copy_gbps"] for b in data["benchmarks"]), float("nan"))
    lines.append(f"device copy bandwidth (read + write), same run: {copy:.0f} GB/s")
    return "\n".join(lines)


def check(shapes=((8, 196, 768, 768), (8, 256, 1280, 1280), (3, 197, 100, 40), (2, 13, 2100, 48))) -> bool:
    """Triton vs the float64 reference on this device: Z, L and the three gradients; max error
    relative to the largest reference value under 1e-2 (bf16) and 1e-3 (fp32)."""
    ok = True
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-3), (torch.float16, 1e-2)):
        for B, N, D, Dv in shapes:
            for r in (1, 16, 128):
                g = torch.Generator(device=DEVICE).manual_seed(B * N + r)
                master = [torch.randn(B, N, D, device=DEVICE, dtype=torch.float64, generator=g),
                          torch.randn(B, r, D, device=DEVICE, dtype=torch.float64, generator=g),
                          torch.randn(B, r, Dv, device=DEVICE, dtype=torch.float64, generator=g)]
                dZ = torch.randn(B, N, Dv, device=DEVICE, dtype=torch.float64, generator=g).to(dtype)
                dL = torch.randn(B, N, r, device=DEVICE, dtype=torch.float64, generator=g).to(dtype)
                # the same (rounded) inputs and upstream gradients for both: the error of the computation
                ours = [t.to(dtype).requires_grad_() for t in master]
                ref = [t.detach().double().requires_grad_() for t in ours]
                Z, L = factorize(*ours, backend="triton")
                Zr, Lr = reference.factorize(*ref, 0.06, 1e-7)
                torch.autograd.backward((Z, L), (dZ, dL))
                torch.autograd.backward((Zr, Lr), (dZ.double(), dL.double()))
                pairs = [("Z", Z, Zr), ("L", L, Lr)] + [
                    (f"d_{n}", a.grad, b.grad) for n, a, b in zip(("dense", "sparse_q", "sparse_v"), ours, ref)]
                # relative to the largest reference value (absolute where it is exactly 0: r = 1)
                errs = {n: ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                        if b.abs().max() > 0 else (a.double() - b).abs().max().item() for n, a, b in pairs}
                worst = max(errs.values())
                ok &= worst < tol
                print(f"{'ok  ' if worst < tol else 'FAIL'} {str(dtype):15s} B{B} N{N} r{r} D{D} Dv{Dv} "
                      + " ".join(f"{n}={e:.1e}" for n, e in errs.items()))
    return ok


def run_without_pytest_benchmark() -> str:
    """The same cases and timing (median of synchronized calls), for a machine without pytest-benchmark."""

    class _Bench:  # the small part of the pytest-benchmark fixture that _run uses
        def __init__(self):
            self.extra_info, self.group = {}, ""

        def pedantic(self, fn, rounds, iterations, warmup_rounds):
            times = []
            for _ in range(rounds):  # fn synchronizes before it returns
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            self.stats = type("S", (), {"stats": type("M", (), {"median": statistics.median(times)})})

    bandwidth = measure_copy_bandwidth()
    rows = []
    cases = [("test_factorize", dict(shape=s, impl=i, mode=m)) for m in ("fwd", "fwdbwd") for i in IMPLS for s in SHAPES]
    cases += [("test_decoder_projection", dict(fused=f)) for f in (False, True)]
    for name, params in cases:
        bench = _Bench()
        globals()[name](bench, bandwidth, **params)
        label = params.get("impl") or ("out_proj" if params["fused"] else "linear_of_Z")
        rows.append({"name": f"{name}[{label}]", "group": bench.group, "params": {k: v for k, v in params.items() if k == "impl"},
                     "stats": {"median": bench.stats.stats.median}, "extra_info": bench.extra_info})
    return json.dumps({"benchmarks": rows})


if __name__ == "__main__":
    if sys.argv[1] == "check":
        sys.exit(0 if check() else 1)
    elif sys.argv[1] == "run":
        with open(sys.argv[2], "w") as f:
            f.write(run_without_pytest_benchmark())
        print(summarize(sys.argv[2]))
    else:
        print(summarize(sys.argv[1]))

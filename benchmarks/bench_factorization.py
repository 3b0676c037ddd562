"""Factorization microbenchmarks: eager reference vs torch.compile vs the fused Triton kernels.

    pytest benchmarks/bench_factorization.py --benchmark-only -s        # CUDA: the full grid
    python benchmarks/bench_factorization.py RESULTS.json               # table from --benchmark-json
    python benchmarks/bench_factorization.py check                      # Triton vs float64, on CUDA
    python benchmarks/bench_factorization.py tune [--write] [--mix]     # sweep the tile table (GPU)
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
    if CUDA:  # the GPU's own time: the wall time above includes the host (launches, autograd, the sync)
        kernel = _kernel_seconds(call)
        if kernel:
            benchmark.extra_info.update(kernel_ms=kernel * 1e3, kernel_copy_fraction=bytes_moved / kernel / bandwidth)


def _kernel_seconds(call, reps: int = 10):
    """Device time per call: the kernels' (and copies') durations summed by torch.profiler over
    `reps` calls. The wall-clock median counts the host as well; on the H200 fwd+bwd of the
    Triton path and of torch.compile both took 1.282 ms of wall time (2026-11-27), which smells
    of a host-bound floor. None where the profiler records no device activity."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                call()
        total_us = sum(e.self_device_time_total for e in prof.key_averages())
    except Exception as exc:  # noqa: BLE001  a profiler problem must not lose the wall-clock figures
        print(f"# kernel time not measured: {type(exc).__name__}: {exc}", flush=True)
        return None
    return total_us / reps / 1e6 if total_us > 0 else None


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
    lines = [f"{'case':58s} {'ms':>8s} {'GB/s':>8s} {'copy%':>6s} {'vs eager':>8s} {'kernel ms':>9s} {'kernel copy%':>12s}"]
    for bench in sorted(data["benchmarks"], key=lambda b: (b["group"], b["name"])):
        median, info = bench["stats"]["median"], bench["extra_info"]
        base = eager.get(bench["group"])
        speedup = f"{base / median:7.2f}x" if base else ""
        name = f"{bench['group']} {bench['params'].get('impl', bench['name'].split('[')[-1].rstrip(']'))}"
        kernel = (f"{info['kernel_ms']:9.3f} {100 * info['kernel_copy_fraction']:11.0f}%" if "kernel_ms" in info
                  else f"{'-':>9s} {'-':>12s}")
        lines.append(f"{name:58s} {median * 1e3:8.3f} {info['gbps']:8.0f} {100 * info['copy_fraction']:5.0f}% {speedup:>8s} "
                     f"{kernel}")
    lines.append("ms: wall-clock median per call (host included, synchronised); kernel ms: device time per call "
                 "(torch.profiler, kernels and copies summed)")
    copy = next((b["extra_info"]["copy_gbps"] for b in data["benchmarks"]), float("nan"))
    lines.append(f"device copy bandwidth (read + write), same run: {copy:.0f} GB/s")
    return "\n".join(lines)


def _errors(B, N, r, D, Dv, dtype, seed=0) -> dict:
    """Relative errors (max |ours - float64| / max |float64|, absolute where the reference is 0)
    of Z, L and the three gradients, the same rounded inputs and upstream gradients for both."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    master = [torch.randn(B, N, D, device=DEVICE, dtype=torch.float64, generator=g),
              torch.randn(B, r, D, device=DEVICE, dtype=torch.float64, generator=g),
              torch.randn(B, r, Dv, device=DEVICE, dtype=torch.float64, generator=g)]
    dZ = torch.randn(B, N, Dv, device=DEVICE, dtype=torch.float64, generator=g).to(dtype)
    dL = torch.randn(B, N, r, device=DEVICE, dtype=torch.float64, generator=g).to(dtype)
    ours = [t.to(dtype).requires_grad_() for t in master]
    ref = [t.detach().double().requires_grad_() for t in ours]
    Z, L = factorize(*ours, backend="triton")
    Zr, Lr = reference.factorize(*ref, 0.06, 1e-7)
    torch.autograd.backward((Z, L), (dZ, dL))
    torch.autograd.backward((Zr, Lr), (dZ.double(), dL.double()))
    pairs = [("Z", Z, Zr), ("L", L, Lr)] + [
        (f"d_{n}", a.grad, b.grad) for n, a, b in zip(("dense", "sparse_q", "sparse_v"), ours, ref)]
    return {n: ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            if b.abs().max() > 0 else (a.double() - b).abs().max().item() for n, a, b in pairs}


CHECKS = [  # (B, N, r, D, Dv), dtypes: the production shapes, then r 1 / 128 and awkward widths
    ((8, 196, 16, 768, 768), ("bf16", "fp16", "fp32", "fp32-tf32")),
    ((8, 256, 16, 1280, 1280), ("bf16",)),
    ((8, 196, 32, 768, 512), ("bf16", "fp32")),
    ((8, 196, 1, 768, 768), ("bf16", "fp32")),
    ((4, 196, 128, 768, 768), ("bf16", "fp32")),
    ((3, 197, 7, 100, 40), ("bf16", "fp16", "fp32")),
    ((2, 13, 16, 2100, 48), ("bf16",)),
]
TOLERANCE = {"bf16": 1e-2, "fp16": 1e-2, "fp32": 1e-4, "fp32-tf32": 1e-2}


def check(checks=CHECKS) -> bool:
    """Triton vs the float64 reference on this device: Z, L and the three gradients, max error
    relative to the largest reference value under TOLERANCE (fp32-tf32: fp32 inputs with
    torch.backends.cuda.matmul.allow_tf32 on)."""
    ok = True
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for (B, N, r, D, Dv), names in checks:
            for name in names:
                torch.backends.cuda.matmul.allow_tf32 = name == "fp32-tf32"
                dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name, torch.float32)
                errs = _errors(B, N, r, D, Dv, dtype, seed=B * N + r)
                worst = max(errs.values())
                ok &= worst < TOLERANCE[name]
                print(f"{'ok  ' if worst < TOLERANCE[name] else 'FAIL'} {name:9s} B{B} N{N} r{r} D{D} Dv{Dv} "
                      + " ".join(f"{n}={e:.1e}" for n, e in errs.items()), flush=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return ok


# ----------------------------------------------------------------------------- tuning the tile table

TUNE_KEYS = [  # (table key, representative shape B, N, r, D, Dv), most important first
    (("bfloat16", 16, 1024), (128, 196, 16, 768, 768)),
    (("bfloat16", 16, None), (128, 256, 16, 1280, 1280)),
    (("bfloat16", 16, 512), (128, 196, 16, 384, 384)),
    (("bfloat16", 32, 1024), (128, 196, 32, 768, 768)),
    (("float16", 16, 1024), (128, 196, 16, 768, 768)),
    (("float32-tf32", 16, 1024), (128, 196, 16, 768, 768)),
    (("float32", 16, 1024), (128, 196, 16, 768, 768)),
    (("bfloat16", 32, None), (128, 256, 32, 1280, 1280)),
    (("float16", 16, None), (128, 256, 16, 1280, 1280)),
]


def _neighbours(tile):
    """The tile and its neighbours one step away in one field (halve / double a block, the other
    warp count, one stage less / more), validated."""
    from stellar.kernels import factorize_triton as ft

    bn, bc, w, s = tile
    out = [tile, (bn // 2, bc, w, s), (bn * 2, bc, w, s), (bn, bc // 2, w, s), (bn, bc * 2, w, s),
           (bn, bc, 8 if w == 4 else 4, s), (bn, bc, w, s - 1), (bn, bc, w, s + 1)]
    good = []
    for t in out:
        try:
            ft.check_tile(t, "candidate")
        except ValueError:
            continue
        if t not in good:
            good.append(t)
    return good


def _tune_inputs(B, N, r, D, Dv, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    dense = torch.randn(B, N, D, device=DEVICE, dtype=dtype, generator=g)
    sq = torch.randn(B, r, D, device=DEVICE, dtype=dtype, generator=g)
    sv = torch.randn(B, r, Dv, device=DEVICE, dtype=dtype, generator=g)
    dZ = torch.randn(B, N, Dv, device=DEVICE, dtype=dtype, generator=g)
    dL = torch.randn(B, N, r, device=DEVICE, dtype=dtype, generator=g)
    return dense, sq, sv, dZ, dL


def tune(budget_s: float = 60.0, write_to: str | None = None, keys=TUNE_KEYS, bench=None, device_name=None) -> list:
    """Sweep each table entry's neighbourhood with triton.testing.do_bench (median, L2 flushed),
    one kernel at a time in the order fwd, rows, dense, values (each at the others' best so far),
    most important keys first, until `budget_s` is spent; a candidate must win by 2 %. With
    `write_to` (kernels/factorize_tiles.py for `--write`), write the table with the winners and
    the device, date and times in each tuned entry's comment. `bench(fn) -> ms` replaces do_bench
    (tests). Returns rows (key, kernel, old tile, old ms, new tile, new ms)."""
    import datetime
    import warnings

    import triton

    from stellar.kernels import factorize_tiles, factorize_triton as ft

    if bench is None:
        from triton.testing import do_bench

        def bench(fn):
            return do_bench(fn, warmup=10, rep=40, return_mode="median")

    start = time.perf_counter()
    device = device_name or torch.cuda.get_device_name()
    tiles = {k: dict(v) for k, v in factorize_tiles.TILES.items()}
    before = {k: dict(v) for k, v in factorize_tiles.TILES.items()}
    notes = _existing_notes()
    rows, tuned = [], []
    was_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for key, (B, N, r, D, Dv) in keys:
            if time.perf_counter() - start > budget_s:
                print(f"tune: budget of {budget_s:.0f} s spent; {key} and later keys keep their entries", flush=True)
                break
            torch.backends.cuda.matmul.allow_tf32 = key[0] == "float32-tf32"
            dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(key[0], torch.float32)
            assert ft.table_key(dtype, r, D, Dv) == key, (key, ft.table_key(dtype, r, D, Dv))
            dense, sq, sv, dZ, dL = _tune_inputs(B, N, r, D, Dv, dtype)
            _, _, logits, inv_n, inv_k = ft.factorize_forward(dense, sq, sv, 0.06, 1e-7, True)
            fns = {"fwd": lambda: ft.factorize_forward(dense, sq, sv, 0.06, 1e-7, True),
                   "bwd": lambda: ft.factorize_backward(dZ, dL, dense, sq, sv, logits, inv_n, inv_k, 0.06, 1e-7)}
            for kernel in ft.KERNELS:
                fn = fns["fwd" if kernel == "fwd" else "bwd"]
                best, best_ms, first_ms = tiles[key][kernel], None, None
                for cand in _neighbours(tiles[key][kernel]):
                    if time.perf_counter() - start > budget_s and best_ms is not None:
                        break
                    factorize_tiles.TILES[key] = dict(tiles[key], **{kernel: cand})
                    ft._FALLBACK.clear()
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("error", RuntimeWarning)  # a retried launch is not this tile
                            ms = bench(fn)
                    except Exception as e:  # noqa: BLE001  a tile this device cannot run: skipped
                        print(f"  {key} {kernel} {cand}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                        continue
                    if first_ms is None:
                        first_ms = ms
                    if best_ms is None or ms < best_ms * 0.98:  # 2 %: not noise
                        best, best_ms = cand, ms
                tiles[key][kernel] = best
                factorize_tiles.TILES[key] = dict(tiles[key])
                rows.append((key, kernel, before[key][kernel], first_ms, best, best_ms))
                print(f"  {key} {kernel}: {rows[-1][2]} {first_ms or float('nan'):.4f} ms -> {best} "
                      f"{best_ms or float('nan'):.4f} ms", flush=True)
            tuned.append(key)
            fwd_ms, bwd_ms = bench(fns["fwd"]), bench(fns["bwd"])
            notes[key] = (f"tuned {datetime.date.today()} on {device}, triton {triton.__version__}, "
                          f"B{B} N{N} r{r} D{D} Dv{Dv}: fwd {fwd_ms:.4f} ms, bwd {bwd_ms:.4f} ms")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was_tf32
        factorize_tiles.TILES.update({k: dict(v) for k, v in tiles.items()})
    if write_to and tuned:
        with open(write_to, "w") as f:
            f.write(ft.render_table(tiles, factorize_tiles.MIX, notes))
        print(f"tune: wrote {len(tuned)} tuned entries to {write_to}", flush=True)
    return rows


def _existing_notes() -> dict:
    """The comments of the table's entries (a tuned entry keeps its comment unless re-tuned)."""
    import ast
    import re

    from stellar.kernels import factorize_tiles

    with open(factorize_tiles.__file__) as f:
        text = f.read()
    return {ast.literal_eval(k): v for k, v in re.findall(r"^    (\(.*?\)): \{.*\},  # (.*)$", text, re.M)}


def mix_report(shape=(128, 196, 16, 768, 768)) -> list:
    """Each MIX choice for bf16 and fp16: fwd+bwd time at `shape` and the worst relative error vs
    float64 at a small shape. The table's MIX is a policy a person sets from this; never changed here."""
    from triton.testing import do_bench

    from stellar.kernels import factorize_triton as ft

    out = []
    B, N, r, D, Dv = shape
    for dtype in (torch.bfloat16, torch.float16):
        dense, sq, sv, dZ, dL = _tune_inputs(B, N, r, D, Dv, dtype)
        for mix in ft.MIX_CHOICES:
            os.environ["STELLAR_FACTORIZE_MIX_PRECISION"] = mix
            try:
                def step():
                    _, _, logits, inv_n, inv_k = ft.factorize_forward(dense, sq, sv, 0.06, 1e-7, True)
                    ft.factorize_backward(dZ, dL, dense, sq, sv, logits, inv_n, inv_k, 0.06, 1e-7)

                ms = do_bench(step, warmup=10, rep=40, return_mode="median")
                err = max(_errors(4, 196, 16, 768, 768, dtype, seed=1).values())
            finally:
                del os.environ["STELLAR_FACTORIZE_MIX_PRECISION"]
            out.append((str(dtype).replace("torch.", ""), mix, ms, err))
            print(f"| MIX {out[-1][0]} | {mix} | fwd+bwd B{B} N{N} r{r} D{D} | {ms:.4f} ms | worst rel. error "
                  f"(B4, vs float64) | {err:.2e} |", flush=True)
    return out


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
    elif sys.argv[1] == "tune":
        import argparse

        ap = argparse.ArgumentParser(prog="bench_factorization.py tune")
        ap.add_argument("--budget-s", type=float, default=60.0, help="stop starting new sweeps after this (default 60)")
        ap.add_argument("--write", action="store_true", help="rewrite kernels/factorize_tiles.py with the winners")
        ap.add_argument("--mix", action="store_true", help="also time and check every MIX choice (bf16, fp16)")
        args = ap.parse_args(sys.argv[2:])
        if not CUDA:
            sys.exit("tune needs a CUDA device (and TRITON_INTERPRET unset)")
        print(f"tune on {torch.cuda.get_device_name()}: do_bench median ms, neighbourhood of each table entry")
        from stellar.kernels import factorize_tiles

        rows = tune(args.budget_s, factorize_tiles.__file__ if args.write else None)
        print("\n| key | kernel | table tile | ms | tuned tile | ms |\n| --- | --- | --- | --- | --- | --- |")
        for key, kernel, old, old_ms, new, new_ms in rows:
            print(f"| {key} | {kernel} | {old} | {old_ms or float('nan'):.4f} | {new} | {new_ms or float('nan'):.4f} |",
                  flush=True)
        if args.mix:  # after the table is written: a timeout here loses only these lines
            mix_report()
    elif sys.argv[1] == "run":
        with open(sys.argv[2], "w") as f:
            f.write(run_without_pytest_benchmark())
        print(summarize(sys.argv[2]))
    else:
        print(summarize(sys.argv[1]))

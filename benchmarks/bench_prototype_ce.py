"""Prototype cross-entropy, forward + backward: eager PyTorch vs torch.compile vs the fused kernels.

    python benchmarks/bench_prototype_ce.py [--json OUT.json] [--budget-s 35]   # CUDA: check, then a table
    python benchmarks/bench_prototype_ce.py --smoke                           # CPU: tiny shapes, interpreter
    pytest benchmarks/bench_prototype_ce.py --benchmark-only -s               # the same cases, pytest-benchmark

Cases (bf16 features and prototypes, K 256, fp32 Sinkhorn-like targets, temperature 0.12):
    M 16384, T 2048 with a target index   (mask_loss: 128 images x 8 views x 16 tokens)
    M 2048,  T 2048 without an index      (clustering_loss: 128 images x 16 tokens)
each at C 16384 (STELLAR) and 65536 (DINO-sized heads). Implementations:
    eager    what the model does today: F.linear in bf16, .float(), log_softmax, the targets
             gathered into an [M, C] tensor, the weighted sum (the clustering head + soft CE)
    compile  the same function under torch.compile (inductor, static shapes)
    fused    stellar.kernels.prototype_cross_entropy(..., backend="triton")
Each time is the median of CUDA-event-timed calls of loss + autograd.grad(loss, (features,
prototypes)). TFLOP/s count the useful 3 x 2MKC flops (logits, d_features, d_prototypes); the
fused kernels execute 5 x 2MKC (the backward recomputes the logits once per gradient). The
matmul rate is a bf16 8192^3 torch.mm measured in the same run (the device's practical
peak), next to cuBLAS's rate for the [M, K] x [K, C] logits product alone. Peak memory is the
most allocated during a call above what the inputs hold. Before timing, the plain mode checks
the fused op against the float64 formula on the device at M 2048 / 4096, C 16384 / 65536
(`--no-check` skips it). The last line printed is a one-line headline (`make gpu` shows it),
also after each case, so a run stopped by `timeout` still ends with one.

Without CUDA the pytest cases skip, unless STELLAR_BENCH_INTERPRET=1 with TRITON_INTERPRET=1
asks for tiny interpreter-mode shapes (as --smoke does): times then mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time

import torch
import torch.nn.functional as F

try:
    import pytest
except ImportError:  # the plain mode needs only torch (a bare GPU machine)
    pytest = None

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
TINY = not CUDA and os.environ.get("STELLAR_BENCH_INTERPRET") == "1" and os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"
K = 256
TEMPERATURE = 0.12
# name: (M, T or None (no index), C)
SHAPES = {
    "M16384-T2048-C16384": (16384, 2048, 16384),
    "M2048-C16384": (2048, None, 16384),
    "M16384-T2048-C65536": (16384, 2048, 65536),
    "M2048-C65536": (2048, None, 65536),
}
TINY_SHAPES = {"M37-T5-C300": (37, 5, 300), "M20-C77": (20, None, 77)}
IMPLS = ("fused", "eager", "compile")

if pytest is not None:
    pytestmark = pytest.mark.skipif(
        not (CUDA or TINY),
        reason="prototype CE benchmarks need CUDA (or STELLAR_BENCH_INTERPRET=1 TRITON_INTERPRET=1: tiny CPU check)",
    )


# ----------------------------------------------------------------------------- the implementations


def eager_loss(features, prototypes, targets, index):
    """Today's path: the head's prototype Linear, .float(), soft CE against gathered targets."""
    logits = F.linear(features, prototypes).float()                  # M x C
    t = targets if index is None else targets[index]                 # M x C
    return -(t * F.log_softmax(logits / TEMPERATURE, dim=-1)).sum(-1).mean()


def fused_loss(features, prototypes, targets, index):
    from stellar.kernels import prototype_cross_entropy

    return prototype_cross_entropy(features, prototypes, targets, TEMPERATURE, index, backend="triton")


_compiled = None


def _impl(name):
    global _compiled
    if name == "compile":
        if _compiled is None:
            _compiled = torch.compile(eager_loss, dynamic=False)
        return _compiled
    return {"eager": eager_loss, "fused": fused_loss}[name]


def make_inputs(M, T, C, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    features = F.normalize(torch.randn(M, K, device=DEVICE, generator=g), dim=-1).to(dtype).requires_grad_()
    prototypes = torch.randn(C, K, device=DEVICE, generator=g).to(dtype).requires_grad_()
    rows = M if T is None else T
    targets = torch.softmax(3 * torch.randn(rows, C, device=DEVICE, generator=g), dim=-1)
    index = None if T is None else torch.randint(0, T, (M,), device=DEVICE, generator=g)
    return features, prototypes, targets, index


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _timed(fn, reps, warmup=2):
    """Median seconds of `fn` (CUDA events on a GPU, wall time on a CPU)."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(reps):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def square_matmul_rate():
    """bf16 TFLOP/s of an 8192^3 torch.mm on this device, this run (nan on a CPU)."""
    if not CUDA:
        return float("nan")
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    return 2 * 8192**3 / _timed(lambda: a @ a, 20) / 1e12


def logits_matmul_rate(M, C):
    """bf16 TFLOP/s of the [M, K] x [K, C] logits product alone (cuBLAS), this run."""
    if not CUDA:
        return float("nan")
    x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(C, K, device=DEVICE, dtype=torch.bfloat16)
    return 2 * M * K * C / _timed(lambda: x @ w.t(), 20) / 1e12


def prepare(impl, shape, dtype=None):
    """(step, info): step() computes the loss and the gradients of features and prototypes."""
    M, T, C = (SHAPES if CUDA else TINY_SHAPES)[shape]
    dtype = dtype or (torch.bfloat16 if CUDA else torch.float32)
    features, prototypes, targets, index = make_inputs(M, T, C, dtype)
    fn = _impl(impl)

    def step():
        loss = fn(features, prototypes, targets, index)
        torch.autograd.grad(loss, (features, prototypes))

    info = {"impl": impl, "shape": shape, "M": M, "T": T, "C": C, "K": K, "dtype": str(dtype).replace("torch.", "")}
    return step, info


def peak_extra_bytes(step):
    """Most memory allocated during one step above what was allocated before it (nan on a CPU)."""
    if not CUDA:
        return float("nan")
    _sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    _sync()
    return torch.cuda.max_memory_allocated() - base


def measure(impl, shape, reps=None):
    """One case: median seconds, peak extra memory and useful TFLOP/s of loss + gradients."""
    step, info = prepare(impl, shape)
    seconds = _timed(step, reps or (20 if CUDA else 2))
    M, C = info["M"], info["C"]
    return {**info, "seconds": seconds, "peak_bytes": peak_extra_bytes(step),
            "useful_tflops": 6 * M * K * C / seconds / 1e12}


def check(cases=((2048, None, 16384), (4096, 512, 65536))) -> bool:
    """The fused op against the float64 formula on this device, at the model's sizes: loss and
    both gradients, max error relative to the largest reference value under 2e-2 (bf16) and
    1e-4 (fp32), on the same rounded inputs."""
    ok = True
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-4)):
        for M, T, C in cases:
            features, prototypes, targets, index = make_inputs(M, T, C, dtype, seed=M + C)
            loss = fused_loss(features, prototypes, targets, index)
            got = (loss, *torch.autograd.grad(loss, (features, prototypes)))
            x, w = (t.detach().double().requires_grad_() for t in (features, prototypes))
            t = targets.double() if index is None else targets.double()[index]
            ref_loss = -(t * F.log_softmax(x @ w.t() / TEMPERATURE, dim=-1)).sum(-1).mean()
            want = (ref_loss, *torch.autograd.grad(ref_loss, (x, w)))
            errs = [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want)]
            good = max(errs) < tol
            ok &= good
            print(f"check {'ok  ' if good else 'FAIL'} {str(dtype):15s} M{M} T{T} C{C}: "
                  + " ".join(f"{n}={e:.1e}" for n, e in zip(("loss", "d_features", "d_prototypes"), errs)), flush=True)
            del x, w, t, ref_loss, want
    return ok


# ----------------------------------------------------------------------------- pytest-benchmark


if pytest is not None:

    @pytest.mark.parametrize("shape", list(SHAPES if CUDA else TINY_SHAPES))
    @pytest.mark.parametrize("impl", IMPLS if CUDA else ("fused", "eager"))
    def test_prototype_ce_fwdbwd(benchmark, shape, impl):
        benchmark.group = f"prototype CE fwd+bwd {shape}"
        step, info = prepare(impl, shape)

        def call():
            step()
            _sync()

        for _ in range(3):  # warm-up: compilation, autotuning, caches
            call()
        benchmark.pedantic(call, rounds=20 if CUDA else 1, iterations=1, warmup_rounds=1)
        seconds = benchmark.stats.stats.median
        benchmark.extra_info.update(peak_bytes=peak_extra_bytes(step),
                                    useful_tflops=6 * info["M"] * K * info["C"] / seconds / 1e12)


# ----------------------------------------------------------------------------- the plain mode


def case_order(shapes, impls):
    """The first shape with every implementation (the headline), then the fused kernels on the
    other shapes, then eager, then compile (the slowest to start): the most telling cases run
    first when the time budget is short."""
    first = [(shapes[0], i) for i in impls]
    return first + [(s, i) for i in impls for s in shapes[1:]]


class _Stopped(Exception):
    """SIGTERM (e.g. `timeout` in make gpu): stop timing and print what was measured."""


def run_all(shapes, impls, budget_s, smoke=False, rows=None, skipped=None):
    """Time the cases in `case_order`, appending to rows / skipped; after each case the headline
    so far goes to stdout, so a run stopped from outside still ends with one."""
    start = time.perf_counter()
    rows = [] if rows is None else rows
    skipped = [] if skipped is None else skipped
    table = TINY_SHAPES if smoke else SHAPES
    square = square_matmul_rate()
    logits_rate = {}
    for shape, impl in case_order(shapes, impls):
        if time.perf_counter() - start > budget_s:
            skipped.append(f"{shape}/{impl}")
            continue
        M, _, C = table[shape]
        if shape not in logits_rate:
            logits_rate[shape] = logits_matmul_rate(M, C)
        try:
            row = measure(impl, shape)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            skipped.append(f"{shape}/{impl} (out of memory)")
            continue
        row["matmul_tflops"], row["logits_mm_tflops"] = square, logits_rate[shape]
        rows.append(row)
        print(f"  {shape} {impl}: {row['seconds'] * 1e3:.3f} ms", file=sys.stderr, flush=True)
        print(headline(_by_case(rows)), flush=True)
    return rows, skipped


def _by_case(rows):
    by_case = {}
    for r in rows:
        by_case.setdefault(r["shape"], {})[r["impl"]] = r
    return by_case


def summarize(rows, skipped) -> list[str]:
    """The table, the same-run matmul rates, what was skipped, and the headline last."""
    lines = [f"{'case':22s} {'impl':8s} {'ms':>9s} {'TFLOP/s':>8s} {'%mm':>5s} {'peak MB':>9s} "
             f"{'vs eager':>8s} {'vs compile':>10s}"]
    by_case = _by_case(rows)
    for shape, impls in by_case.items():
        for impl, r in impls.items():
            def ratio(other):
                return f"{impls[other]['seconds'] / r['seconds']:.2f}x" if other in impls and other != impl else ""

            pct = 100 * r["useful_tflops"] / r["matmul_tflops"]
            lines.append(f"{shape:22s} {impl:8s} {r['seconds'] * 1e3:9.3f} {r['useful_tflops']:8.1f} {pct:5.0f} "
                         f"{r['peak_bytes'] / 2**20:9.1f} {ratio('eager'):>8s} {ratio('compile'):>10s}")
    if rows:
        lines.append(f"bf16 matmul this run: 8192^3 {rows[0]['matmul_tflops']:.0f} TFLOP/s; the logits product "
                     "alone (cuBLAS): " + ", ".join(f"{s} {next(iter(i.values()))['logits_mm_tflops']:.0f}"
                                                    for s, i in by_case.items()))
        lines.append("TFLOP/s count 3 x 2MKC (the fused kernels execute 5 x 2MKC); %mm: of the 8192^3 rate")
    if skipped:
        lines.append("skipped (time budget or memory): " + ", ".join(skipped))
    lines.append(headline(by_case))
    return lines


def headline(by_case) -> str:
    if not by_case:
        return "prototype_ce: no case ran"
    shape, impls = next(iter(by_case.items()))
    f = impls.get("fused")
    if f is None:
        return f"prototype_ce {shape}: the fused case did not run"
    parts = [f"prototype_ce {shape} fwd+bwd: fused {f['seconds'] * 1e3:.2f} ms {f['useful_tflops']:.0f} TFLOP/s"]
    if f["matmul_tflops"] == f["matmul_tflops"]:
        parts.append(f"{100 * f['useful_tflops'] / f['matmul_tflops']:.0f}% of mm")
    for other in ("eager", "compile"):
        if other in impls:
            parts.append(f"{impls[other]['seconds'] / f['seconds']:.2f}x {other}")
    if "eager" in impls and impls["eager"]["peak_bytes"] > 0:
        parts.append(f"peak {100 * f['peak_bytes'] / impls['eager']['peak_bytes']:.1f}% of eager")
    return ", ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--budget-s", type=float, default=35.0,
                        help="start no case after this many seconds (make gpu gives the whole run 60 s)")
    parser.add_argument("--shapes", nargs="*", help=f"subset of {list(SHAPES)}")
    parser.add_argument("--impls", nargs="*", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU in Triton's interpreter")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 check on the device first")
    args = parser.parse_args(argv)
    global CUDA, DEVICE
    if args.smoke:
        if not os.environ.get("TRITON_INTERPRET"):
            os.environ["TRITON_INTERPRET"] = "1"  # before the kernels module is first imported
        CUDA, DEVICE = False, "cpu"
        shapes, impls = list(TINY_SHAPES), [i for i in args.impls if i != "compile"]
    elif not CUDA:
        print("no CUDA device: nothing to time (use --smoke for a tiny CPU run)")
        return 0
    else:
        shapes, impls = args.shapes or list(SHAPES), args.impls
    checked = None
    if CUDA:
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
        if not args.no_check:
            checked = check()
    rows, skipped = [], []

    def stop(signum, frame):
        raise _Stopped()

    signal.signal(signal.SIGTERM, stop)
    try:
        run_all(shapes, impls, args.budget_s, smoke=args.smoke, rows=rows, skipped=skipped)
    except _Stopped:
        skipped.append("the rest (stopped by SIGTERM)")
    if args.json:
        # NaN (no CUDA: no memory figures) -> null
        clean = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in rows]
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if CUDA else "cpu (interpreter)",
                       "torch": torch.__version__, "rows": clean, "skipped": skipped}, f, indent=1)
    lines = summarize(rows, skipped)
    if checked is not None:
        lines[-1] = f"check {'PASS' if checked else 'FAIL'}; " + lines[-1]
    print("\n".join(lines))
    return 0 if checked in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())

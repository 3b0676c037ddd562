"""Multi-crop throughput: the PyTorch reference (apply_crops) against the fused op.

17 views per image (image + 8 global at 224 px, 8 local at 96 px), rows drawn by
`sample_multicrop_params`, random uint8 images around 500x375 (ImageNet's typical size).

    pytest benchmarks/bench_multicrop.py --benchmark-only     # pytest-benchmark, CPU (and CUDA)
    python benchmarks/bench_multicrop.py [--device cuda] [--batch 128]   # a printed table

CPU figures are per core (torch.set_num_threads(1)). On a GPU the CUDA op alone is timed with
CUDA events (median of repeats after warm-up) and set against a batch-128 training step
(docs: ../shared/PERF.md: 329 ms for the public eager step, 160 ms for the 800 img/s target).
"""
import argparse
import statistics
import time

import pytest
import torch

from stellar.data.augment import apply_crops, sample_multicrop_params
from stellar.ops import multicrop

GLOBAL, LOCAL, NUM_GLOBAL, NUM_LOCAL = 224, 96, 8, 8
VIEWS = 1 + NUM_GLOBAL + NUM_LOCAL
STEP_MS = {"public eager step": 329.0, "800 img/s target step": 160.0}


def make_batch(batch, device="cpu", seed=0):
    """Random uint8 images (list of Tensor[3, H, W], H, W around 375, 500) and their rows."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(int(h), int(w)) for h, w in zip(torch.randint(330, 420, (batch,), generator=g),
                                                torch.randint(440, 560, (batch,), generator=g))]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g).to(device) for h, w in sizes]
    rows = sample_multicrop_params(sizes, g, num_global=NUM_GLOBAL, num_local=NUM_LOCAL)
    return images, torch.cat([rows["image"], rows["global"]]), rows["local"]


def run_reference(images, big, small):
    return apply_crops(images, big, GLOBAL, normalize=False), apply_crops(images, small, LOCAL, normalize=False)


def run_op(images, big, small, dtype=torch.float32):
    hwc = [im.permute(1, 2, 0) for im in images]
    return (multicrop(hwc, big, GLOBAL, dtype=dtype, normalize=False),
            multicrop(hwc, small, LOCAL, dtype=dtype, normalize=False))


def _cpu_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _cuda_ms(fn, repeats=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# ---------------------------------------------------------------------------- pytest-benchmark
@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("path", ["reference", "op"])
def test_cpu_multicrop_per_core(benchmark, one_thread, path):
    images, big, small = make_batch(2)
    fn = (lambda: run_reference(images, big, small)) if path == "reference" else (lambda: run_op(images, big, small))
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = len(images) / benchmark.stats.stats.median
    benchmark.extra_info["views_per_image"] = VIEWS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_multicrop_batch128(benchmark, dtype):
    images, big, small = make_batch(128, "cuda")

    def fn():
        run_op(images, big, small, dtype)
        torch.cuda.synchronize()

    benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=2)
    benchmark.extra_info["images_per_s"] = 128 / benchmark.stats.stats.median


# ---------------------------------------------------------------------------- the printed table
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=None, help="images per batch (cpu 4, cuda 128)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lines = []
    if args.device == "cpu":
        torch.set_num_threads(1)
        B = args.batch or 4
        images, big, small = make_batch(B)
        ref = _cpu_seconds(lambda: run_reference(images, big, small), args.repeats)
        op = _cpu_seconds(lambda: run_op(images, big, small), args.repeats)
        lines.append(f"| path (1 CPU thread, {VIEWS} views/img, batch {B}) | ms/image | images/s/core |")
        lines.append("| --- | --- | --- |")
        lines.append(f"| PyTorch reference apply_crops | {ref / B * 1e3:.1f} | {B / ref:.2f} |")
        lines.append(f"| C++ CPU op | {op / B * 1e3:.1f} | {B / op:.2f} |")
        lines.append(f"| speed-up | | {ref / op:.1f}x |")
    else:
        B = args.batch or 128
        images, big, small = make_batch(B, "cuda")
        lines.append(f"| CUDA op, batch {B}, {VIEWS} views/img ({torch.cuda.get_device_name()}) "
                     f"| ms/batch | images/s | share of step {' / '.join(f'{v:.0f} ms' for v in STEP_MS.values())} |")
        lines.append("| --- | --- | --- | --- |")
        for dtype in (torch.float32, torch.bfloat16):
            for rows_where in ("host rows", "device rows"):
                b, s = (big, small) if rows_where == "host rows" else (big.cuda(), small.cuda())
                ms = _cuda_ms(lambda: run_op(images, b, s, dtype))
                share = " / ".join(f"{100 * ms / v:.2f} %" for v in STEP_MS.values())
                lines.append(f"| {str(dtype).replace('torch.', '')}, {rows_where} | {ms:.3f} | {B / ms * 1e3:,.0f} | {share} |")
        only = _cuda_ms(lambda: multicrop([im.permute(1, 2, 0) for im in images], big.cuda(), GLOBAL,
                                          dtype=torch.bfloat16, normalize=False))
        lines.append(f"| bf16, 224 px views only ({big.shape[0]} crops) | {only:.3f} | | |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

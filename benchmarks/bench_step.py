"""The training step, reference against fast, from the same weights and batches in one process.

    python benchmarks/bench_step.py                         # CUDA: ViT-B/16 public config, batch 128
    python benchmarks/bench_step.py --device cpu            # the tiny smoke run CI executes (no timing claims)
    python benchmarks/bench_step.py --json runs/step.json --batch 64 --steps 30 --budget-s 150

Variants (each a set of config switches on top of the previous eager one; `fast` = all the
eager levers plus torch.compile; the `fast+...` variants add one more lever to `fast`):
    reference       today's step: eager, one encoder call per view group, head logits + repeated,
                    gathered targets (clustering.fused=false), foreach AdamW, clip_grad_norm_, the
                    losses read on the host every step (it stands for the public code's structure)
    +sync-free      losses kept on the device (read every 10 steps), fused AdamW, device-side skip
    +packed         the three view groups in one packed encoder pass (attention per group, SDPA)
    +fused-ce       clustering losses through stellar.kernels.prototype_cross_entropy, indexed targets
    +bf16-views     the views arrive in bfloat16 (as a loader can hand them over)
    fast            all of the above + torch.compile of the pieces (train.compile)
    fast+residual-bf16, fast+cuda-graphs, fast+fp8      one more lever each (GPU)
    fast-fused-ce   fast with the clustering losses compiled instead of fused (GPU)

Per variant: img/s and ms/step (median over --steps after --warmup), MFU (FLOPs of one
forward+backward counted by torch.utils.flop_counter on the reference path, over the device's
dense bf16 peak: 989 TFLOP/s for H100 SXM and H200; --peak-tflops for others), peak memory, the
first step's wall time (compilation included), the maximum relative difference of its first-step
losses from the reference's (same weights, same batch: the same objective), and time per stage
(CUDA events around the model's pieces, the backward and the optimizer, in a separate short run).
Then the `fast` variant (or the last that ran) fed by the real loader from a folder of JPEGs written
here: the share of the step spent waiting for batches.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stellar.model import LOSS_NAMES, build_model  # noqa: E402
from stellar.train.config import load_config, merge  # noqa: E402
from stellar.train.step import (LossTracker, StepOptions, build_optimizer, prepare_model,  # noqa: E402
                                update_with_sync, update_without_sync)
from stellar.train.synthetic import SyntheticLoader  # noqa: E402
from stellar.train.trainer import autocast_dtype, check_finite, forward_losses, loss_values, pick_device  # noqa: E402

# Dense bf16 matrix peak, TFLOP/s (vendor figures, no sparsity).
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}

# name -> (model overrides, train overrides, bf16 views)
EAGER = {
    "reference": ({"pack_views": False, "clustering": {"fused": False}},
                  {"sync_free": False, "fused_adamw": False, "compile": False}, False),
    "+sync-free": ({"pack_views": False, "clustering": {"fused": False}}, {"sync_free": True}, False),
    "+packed": ({"pack_views": True, "clustering": {"fused": False}}, {"sync_free": True}, False),
    "+fused-ce": ({"pack_views": True, "clustering": {"fused": True}}, {"sync_free": True}, False),
    "+bf16-views": ({"pack_views": True, "clustering": {"fused": True}}, {"sync_free": True}, True),
}
FAST_MODEL, FAST_TRAIN = EAGER["+bf16-views"][0], {"sync_free": True, "compile": True}
VARIANTS = {
    **EAGER,
    "fast": (FAST_MODEL, FAST_TRAIN, True),
    "fast+residual-bf16": ({**FAST_MODEL, "residual_bf16": True}, FAST_TRAIN, True),
    "fast+cuda-graphs": (FAST_MODEL, {**FAST_TRAIN, "cuda_graphs": True}, True),
    "fast+fp8": (FAST_MODEL, {**FAST_TRAIN, "fp8": True}, True),
    # the clustering losses left to torch.compile instead of the fused kernel (which was 2.6x
    # slower than compile at M16384 C16384 on the H200, benchmarks/RESULTS.md)
    "fast-fused-ce": ({**FAST_MODEL, "clustering": {"fused": False}}, FAST_TRAIN, True),
}
GPU_ORDER = ["reference", "fast", "fast-fused-ce", "+sync-free", "+packed", "+fused-ce", "+bf16-views",
             "fast+residual-bf16", "fast+cuda-graphs", "fast+fp8"]
CPU_ORDER = ["reference", "+sync-free", "+packed", "+fused-ce", "+bf16-views"]
# The CPU smoke configuration (configs/tiny.yaml, smaller): CI runs it, it proves nothing about speed.
SMOKE = ["model.arch=tiny", "model.img_size=32", "model.patch_size=8", "model.dim=32", "model.depth=2",
         "model.heads=2", "model.num_tokens=4", "model.decoder={dim: 32, depth: 1, heads: 2, mlp_dim: 64}",
         "model.clustering={hidden: 32, bottleneck: 16, prototypes: 64}", "data.global_size=32",
         "data.local_size=16", "data.num_global=2", "data.num_local=2", "data.num_workers=0"]


# ---------------------------------------------------------------------------- inputs

def make_batches(cfg: dict, count: int, device: torch.device) -> list[dict]:
    """``count`` synthetic batches of train.batch_size images in [0, 1] with their kept patches,
    made on ``device`` (stellar.train.synthetic): every variant sees the same batches and masks."""
    loader = SyntheticLoader(cfg, device=device)
    return [loader.global_batch(k) for k in range(count)]


def to_bf16(batch: dict) -> dict:
    return {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


def write_jpegs(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` 500x375 JPEGs (smooth random colour fields plus noise, ~80 kB) in folder/train/{a,b}/."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        low = torch.rand(3, 6, 8, generator=g)
        img = torch.nn.functional.interpolate(low[None], size=(375, 500), mode="bicubic", align_corners=False)[0]
        img = (img + 0.08 * torch.randn(img.shape, generator=g)).clamp(0, 1)
        arr = (img.permute(1, 2, 0) * 255).to(torch.uint8).numpy()
        d = folder / "train" / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(d / f"{i:05d}.jpg", quality=90)
    return folder


# ---------------------------------------------------------------------------- timing

class Clock:
    """CUDA events on a GPU, perf_counter on the CPU; elapsed() after a synchronisation."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self, device):
        if self.cuda:
            torch.cuda.synchronize(device)


class Stages:
    """Records marks around the model's pieces, the backward and the optimizer (wrapping them)."""

    PIECES = ("reconstruction", "image_targets", "masked_view_losses", "local_view_losses")

    def __init__(self, model, clock: Clock):
        self.clock, self.spans, self.on = clock, {}, False
        self._wrap_encoder(model)
        for name in self.PIECES:
            fn = model._piece(name)
            wrapped = self._timed(name, fn)
            if name in model._compiled:
                model._compiled[name] = wrapped
            else:
                setattr(model, name, wrapped)

    def _wrap_encoder(self, model):
        enc = model.encoder
        names = iter(())
        orig_groups, orig_forward = enc.forward_groups, enc.forward

        def groups_fn(groups):
            return self._timed("encoder, 3 groups packed", orig_groups)(groups)

        def forward_fn(images, keep=None):
            label = next(names, "encoder")
            return self._timed(label, orig_forward)(images, keep)

        orig_encode = model.encode_views

        def encode(image, views, keep, local):
            nonlocal names
            names = iter(["encoder: full images", "encoder: masked views", "encoder: local views"])
            return orig_encode(image, views, keep, local)

        enc.forward_groups = groups_fn
        enc.forward = forward_fn
        model.encode_views = encode

    def _timed(self, name, fn):
        def run(*a, **k):
            if not self.on:
                return fn(*a, **k)
            start = self.clock.mark()
            out = fn(*a, **k)
            self.spans.setdefault(name, []).append((start, self.clock.mark()))
            return out
        return run

    def span(self, name):
        @contextlib.contextmanager
        def ctx():
            start = self.clock.mark()
            yield
            self.spans.setdefault(name, []).append((start, self.clock.mark()))
        return ctx() if self.on else contextlib.nullcontext()

    def summary(self, steps: int) -> dict[str, float]:
        return {name: sum(self.clock.ms(a, b) for a, b in marks) / steps for name, marks in self.spans.items()}


# ---------------------------------------------------------------------------- one variant

def run_variant(name, cfg, state, batches, device, args, flops=None):
    model_over, train_over, bf16_views = VARIANTS[name]
    mcfg = merge(cfg["model"], model_over)
    train = merge(cfg["train"], train_over)
    if device.type != "cuda":
        train["compile_backend"] = args.cpu_compile_backend
    opts = StepOptions.from_config(train, device, log_every=10)
    amp = autocast_dtype(train["amp"], device)
    model = build_model(mcfg)
    model.load_state_dict(state)
    model = model.to(device).train()
    prepare_model(model, opts)
    optimizer = build_optimizer(model, train, opts)
    clip = train["grad_clip"]
    feed = [to_bf16(b) for b in batches] if bf16_views else batches
    tracker = LossTracker(LOSS_NAMES, opts.log_every, device)
    clock = Clock(device)
    stages = Stages(model, clock)

    def step(i, batch):
        if opts.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with stages.span("forward (all pieces)"):
            out = forward_losses(model, batch, amp)
        if opts.sync_free:
            with stages.span("backward + clip + optimizer"):
                norm, _ = update_without_sync(out["loss"], optimizer, clip)
            tracker.add(i, out, norm)
            if tracker.full:
                tracker.read()                                   # the one host read per 10 steps
        else:
            values = loss_values(out)                            # host read every step (the reference)
            check_finite(i, values, None)
            with stages.span("backward + clip + optimizer"):
                update_with_sync(out["loss"], optimizer, clip)
        if model.teacher is not None:
            model.update_teacher()                               # as the trainer, after the optimizer step
        return out

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    # First step: its losses (before any update) are compared with the reference's; it compiles.
    t0 = time.perf_counter()
    first = step(0, feed[0])
    first_losses = {"loss": float(first["loss"].detach()), **{k: float(v) for k, v in first["losses"].items()}}
    clock.sync(device)
    first_s = time.perf_counter() - t0
    del first
    for i in range(1, args.warmup):
        step(i, feed[i % len(feed)])
    # Timed steps.
    clock.sync(device)
    marks = [clock.mark()]
    for i in range(args.steps):
        step(args.warmup + i, feed[i % len(feed)])
        marks.append(clock.mark())
    clock.sync(device)
    tracker.read()
    ms = [clock.ms(a, b) for a, b in zip(marks, marks[1:])]
    median = statistics.median(ms)
    # Stages, in a separate short run (the marks cost a little).
    stages.on = True
    n_stage = min(3, args.steps)
    for i in range(n_stage):
        step(10_000 + i, feed[i % len(feed)])
    clock.sync(device)
    tracker.read()
    stage_ms = stages.summary(n_stage)
    peak_gb = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    B = batches[0]["image"].shape[0]
    result = {"variant": name, "batch": B, "ms_per_step": median, "img_per_s": B / median * 1e3,
              "ms_all": ms, "first_step_s": first_s, "peak_gb": peak_gb, "stages_ms": stage_ms,
              "first_losses": first_losses, "options": vars(opts) if hasattr(opts, "__dict__") else str(opts)}
    if flops:
        result["tflops_per_s"] = flops / (median / 1e3) / 1e12
        if args.peak_tflops:
            result["mfu"] = result["tflops_per_s"] / args.peak_tflops
    return result, model, opts, amp, train


def count_flops(cfg, state, batch, device) -> float:
    """FLOPs of one forward + backward of the reference path (eager, plain ops flop_counter knows)."""
    from torch.utils.flop_counter import FlopCounterMode
    mcfg = merge(cfg["model"], VARIANTS["reference"][0])
    model = build_model(mcfg)
    model.load_state_dict(state)
    model = model.to(device).train()
    amp = autocast_dtype(cfg["train"]["amp"], device)
    with FlopCounterMode(display=False) as counter:
        out = forward_losses(model, batch, amp)
        out["loss"].backward()
    total = counter.get_total_flops()
    del model, out
    return float(total)


def rel_diff(a: dict, b: dict) -> float:
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in b if k in a)


# ---------------------------------------------------------------------------- the real loader

def run_loader(model, opts, amp, train, cfg, device, args, synthetic_ms):
    from stellar.train.step import Prefetcher
    from stellar.train.trainer import default_loader_fn, endless, next_batch
    B = args.batch
    steps = args.loader_steps
    with tempfile.TemporaryDirectory(prefix="bench_step_jpegs_") as tmp:
        t0 = time.perf_counter()
        root = write_jpegs(Path(tmp), max(2 * B, 16))
        write_s = time.perf_counter() - t0
        run_cfg = merge(cfg, {"data": {"root": str(root)}})
        if args.loader_backend != "config":
            run_cfg["data"]["backend"] = args.loader_backend
        loader = default_loader_fn(run_cfg, 0, 1)                # the trainer's own loader
        batches = endless(loader)
        feed = Prefetcher(lambda: next_batch(batches), device, enabled=opts.prefetch)
        optimizer = build_optimizer(model, train, opts)
        tracker = LossTracker(LOSS_NAMES, opts.log_every, device)
        clock = Clock(device)
        wait, total = [], []
        for i in range(steps + 2):
            clock.sync(device) if i == 2 else None
            t0 = time.perf_counter()
            batch = feed.next()
            t1 = time.perf_counter()
            if opts.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            out = forward_losses(model, batch, amp)
            norm, _ = update_without_sync(out["loss"], optimizer, train["grad_clip"]) if opts.sync_free else (
                update_with_sync(out["loss"], optimizer, train["grad_clip"]), None)
            tracker.add(i, out, norm) if norm is not None else None
            if model.teacher is not None:
                model.update_teacher()
            if tracker.full:
                tracker.read()
            if i >= 2:                                           # 2 warm-up steps
                wait.append(t1 - t0)
                total.append(time.perf_counter() - t0)
        clock.sync(device)
        wall = sum(total) + 0.0
        tracker.read()
    ms = wall / steps * 1e3
    return {"backend": getattr(loader, "backend", run_cfg["data"]["backend"]), "jpegs_written_s": write_s,
            "steps": steps, "ms_per_step": ms, "img_per_s": B / ms * 1e3,
            "host_wait_share": sum(wait) / wall, "slowdown_vs_synthetic": ms / synthetic_ms - 1}


# ---------------------------------------------------------------------------- main

def environment(device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        commit = "unknown"
    env = {"torch": torch.__version__, "python": platform.python_version(), "commit": commit,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    return env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cuda | cpu (cpu: the tiny smoke run)")
    p.add_argument("--config", default=None, help="experiment file (default configs/vitb16.yaml on CUDA, "
                   "the tiny smoke config on CPU)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 128 on CUDA, 4 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 20 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on CUDA, 1 on CPU)")
    p.add_argument("--variants", default=None, help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--budget-s", type=float, default=None, help="skip the remaining variants past this many seconds")
    p.add_argument("--loader-steps", type=int, default=None, help="steps fed by the real loader (0: skip)")
    p.add_argument("--loader-backend", default="config", help="data.backend for the loader phase (config: the config's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (TFLOP/s)")
    p.add_argument("--cpu-compile-backend", default="aot_eager", help="torch.compile backend for CPU variants")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--headline", default=None, metavar="JSON", help="print one line from a --json report and exit")
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    return p.parse_args(argv)


def headline(path: str) -> str:
    """One line for a summary table: the fastest variant against the reference, from a --json report."""
    r = json.loads(Path(path).read_text())
    if not r["results"]:
        return "no variant ran: " + "; ".join(r["notes"])
    ref = r["results"][0]
    best = min(r["results"], key=lambda x: x["ms_per_step"])
    peak = f", peak {best['peak_gb']:.1f} GB" if best.get("peak_gb") is not None else ""
    mfu = f", MFU {100 * best['mfu']:.0f} %" if best.get("mfu") is not None else ""
    return (f"batch {r['batch']}: {best['variant']} {best['img_per_s']:.0f} img/s = "
            f"{ref['ms_per_step'] / best['ms_per_step']:.2f}x reference ({ref['img_per_s']:.0f} img/s){mfu}{peak}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.headline:
        print(headline(args.headline))
        return 0
    device = pick_device(args.device)  # CUDA always with an index (torch 2.11's set_device needs one)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config = args.config or (str(ROOT / "configs" / "vitb16.yaml") if cuda else None)
    overrides = list(args.overrides) if cuda or args.config else [*SMOKE, *args.overrides]
    args.batch = args.batch or (128 if cuda else 4)
    args.steps = args.steps or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.loader_steps = args.loader_steps if args.loader_steps is not None else (10 if cuda else 2)
    args.budget_s = args.budget_s or (170.0 if cuda else 600.0)
    order = args.variants.split(",") if args.variants else (GPU_ORDER if cuda else CPU_ORDER)
    unknown = [v for v in order if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    if order[0] != "reference":
        order = ["reference", *[v for v in order if v != "reference"]]
    if args.peak_tflops is None and cuda:
        name = torch.cuda.get_device_name(device)
        args.peak_tflops = next((v for k, v in PEAKS.items() if k in name), None)
    cfg = load_config(config, [*overrides, f"train.batch_size={args.batch}",
                               f"train.device={'cuda' if cuda else 'cpu'}"])
    env = environment(device)
    print(f"# bench_step on {env['device']} (torch {env['torch']}, commit {env['commit']}), batch {args.batch}, "
          f"{args.steps} timed steps after {args.warmup} warm-up; peak "
          f"{args.peak_tflops or 'unknown'} TFLOP/s (dense bf16)", flush=True)
    if not cuda:
        print("# CPU: the tiny smoke configuration -- a check that every variant runs, not a timing", flush=True)

    torch.manual_seed(0)
    state = {k: v.clone() for k, v in build_model(cfg["model"]).state_dict().items()}
    started = time.perf_counter()
    results, notes, last = [], [], None
    batches = None
    flops = None
    while batches is None:
        try:
            batches = make_batches(cfg, 2, device)
            flops = count_flops(cfg, state, batches[0], device)
        except torch.cuda.OutOfMemoryError:
            batches = None
            gc.collect()
            torch.cuda.empty_cache()
            if args.batch <= 8:
                raise
            notes.append(f"batch {args.batch} ran out of memory counting FLOPs; halved to {args.batch // 2}")
            print("# " + notes[-1], flush=True)
            args.batch //= 2
            cfg["train"]["batch_size"] = args.batch
    print(f"# FLOPs per step (forward + backward, reference path): {flops / 1e12:.2f} TFLOP", flush=True)
    ref_losses = None
    for name in order:
        if time.perf_counter() - started > args.budget_s:
            notes.append(f"{name}: skipped, past the {args.budget_s:.0f} s budget")
            print("# " + notes[-1], flush=True)
            continue
        if name == "fast+fp8" and cuda and torch.cuda.get_device_capability(device) < (8, 9):
            notes.append(f"{name}: skipped, compute capability below 8.9")
            continue
        if not cuda and name in ("fast+cuda-graphs", "fast+fp8"):
            notes.append(f"{name}: skipped on CPU (CUDA only)")
            continue
        t0 = time.perf_counter()
        try:
            res, model, opts, amp, train = run_variant(name, cfg, state, batches, device, args, flops)
        except torch.cuda.OutOfMemoryError as exc:
            notes.append(f"{name}: out of memory at batch {args.batch} ({str(exc).splitlines()[0]})")
            print("# " + notes[-1], flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        except Exception as exc:                                 # one broken lever must not hide the others
            notes.append(f"{name}: failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            print("# " + notes[-1], flush=True)
            if not cuda:
                raise
            gc.collect()
            torch.cuda.empty_cache()
            continue
        if ref_losses is None:
            ref_losses = res["first_losses"]
        res["max_rel_diff_first_losses"] = rel_diff(res["first_losses"], ref_losses)
        res["variant_s"] = time.perf_counter() - t0
        results.append(res)
        print(f"  {name:20s} {res['ms_per_step']:9.1f} ms/step {res['img_per_s']:9.1f} img/s  "
              f"first step {res['first_step_s']:.1f} s  max rel diff {res['max_rel_diff_first_losses']:.1e}", flush=True)
        if last is None or last[0] != "fast":                     # the loader phase runs `fast` (else the last)
            last = (name, res, model, opts, amp, train)
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    loader = None
    best = min(results, key=lambda r: r["ms_per_step"]) if results else None
    if args.loader_steps and best is not None and last is not None:
        # The loader phase reuses the `fast` variant's model (already compiled), else the last one's.
        name, res, model, opts, amp, train = last
        try:
            loader = run_loader(model, opts, amp, train, cfg, device, args, res["ms_per_step"])
            loader["variant"] = name
        except Exception as exc:
            loader = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    report = {"environment": env, "batch": args.batch, "flops_per_step": flops, "peak_tflops": args.peak_tflops,
              "results": results, "loader": loader, "notes": notes}
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


def format_report(report: dict) -> str:
    lines = ["", f"== training step, batch {report['batch']}, {report['environment']['device']} "
             f"(torch {report['environment']['torch']}, commit {report['environment']['commit']}); "
             f"MFU over {report['peak_tflops'] or '?'} TFLOP/s dense bf16",
             "| variant | ms/step | img/s | vs reference | MFU | peak GB | first step s | max rel diff (step-1 losses) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    ref = report["results"][0]["ms_per_step"] if report["results"] else None
    for r in report["results"]:
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
        peak = f"{r['peak_gb']:.1f}" if r.get("peak_gb") is not None else "-"
        lines.append(f"| {r['variant']} | {r['ms_per_step']:.1f} | {r['img_per_s']:.1f} | {ref / r['ms_per_step']:.2f}x | "
                     f"{mfu} | {peak} | {r['first_step_s']:.1f} | {r['max_rel_diff_first_losses']:.1e} |")
    stage_names = []
    for r in report["results"]:
        stage_names += [k for k in r["stages_ms"] if k not in stage_names]
    if stage_names:
        lines += ["", "stages, ms per step (events around the pieces; 'forward (all pieces)' and the update span the rest)",
                  "| stage | " + " | ".join(r["variant"] for r in report["results"]) + " |",
                  "| --- |" + " --- |" * len(report["results"])]
        for s in stage_names:
            lines.append(f"| {s} | " + " | ".join(f"{r['stages_ms'][s]:.1f}" if s in r["stages_ms"] else "-"
                                                 for r in report["results"]) + " |")
    ld = report.get("loader")
    if ld:
        if "error" in ld:
            lines.append(f"\nreal loader: not measured ({ld['error']})")
        else:
            lines.append(f"\nreal loader ({ld['backend']}, variant {ld['variant']}, {ld['steps']} steps): "
                         f"{ld['ms_per_step']:.1f} ms/step = {ld['img_per_s']:.1f} img/s; host waiting for batches "
                         f"{100 * ld['host_wait_share']:.1f} % of the step; {100 * ld['slowdown_vs_synthetic']:+.1f} % "
                         f"vs synthetic batches")
    for n in report["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

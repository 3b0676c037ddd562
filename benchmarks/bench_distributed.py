"""World size 1 through the distributed path against a plain process, on one GPU.

    python benchmarks/bench_distributed.py run --out DIR [key=value ...]            # plain
    torchrun --standalone --nproc-per-node 1 benchmarks/bench_distributed.py run --out DIR [key=value ...]
    python benchmarks/bench_distributed.py compare PLAIN OTHER [--reference PLAIN2]

``run`` pretrains with synthetic batches made on the GPU (global batch k is a pure function of
(seed, k); rank r takes rows [r*b, (r+1)*b)), so the loader costs nothing and every launch sees
the same data. ``compare`` prints the largest per-step relative loss difference (and, given a
second plain run, the run-to-run noise of the GPU kernels), and the median step times: the
DDP overhead is OTHER's median step time over PLAIN's. bash benchmarks/gpu_distributed.sh runs all.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

# ViT-B/16 at the paper's views (8 masked global, 8 local), batch 64 per GPU; override on the command line.
DEFAULTS = ["train.batch_size=64", "train.steps=40", "train.checkpoint_every=40", "train.keep_checkpoints=1",
            "train.warmup=0.1", "log.progress=false", "log.tensorboard=false"]


def device_batches(cfg, rank, world_size):
    """Synthetic global batches made on this process's device (stellar.train.synthetic), sliced per rank."""
    from stellar.train.synthetic import SyntheticLoader

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return SyntheticLoader(cfg, rank, world_size, batches_per_epoch=10_000, device=device)


def run(args) -> None:
    from stellar.train import load_config, pretrain

    cfg = load_config(args.config, [*DEFAULTS, *args.overrides])
    pretrain(cfg, args.out, loader_fn=device_batches)


def _rows(run_dir):
    from stellar.train import read_metrics

    return read_metrics(Path(run_dir) / "metrics.csv")


def max_rel_diff(a, b) -> float:
    worst = 0.0
    for ra, rb in zip(a, b):
        for key in ra:
            if key in ("step", "img_per_s", "lr"):
                continue
            worst = max(worst, abs(ra[key] - rb[key]) / max(abs(rb[key]), 1e-12))
    return worst


def compare(args) -> int:
    plain, other = _rows(args.plain), _rows(args.other)
    if [r["step"] for r in plain] != [r["step"] for r in other]:
        print(f"different steps: {len(plain)} vs {len(other)} rows")
        return 1
    diff = max_rel_diff(other, plain)
    noise = max_rel_diff(_rows(args.reference), plain) if args.reference else None
    t_plain = statistics.median(1.0 / r["img_per_s"] for r in plain[10:])
    t_other = statistics.median(1.0 / r["img_per_s"] for r in other[10:])
    print(f"{args.label}: max per-step relative loss difference vs plain {diff:.2e}"
          + (f" (plain vs plain again: {noise:.2e})" if noise is not None else ""))
    print(f"{args.label}: median time per image {1e3 * t_other:.3f} ms vs plain {1e3 * t_plain:.3f} ms "
          f"-> overhead {100 * (t_other / t_plain - 1):+.1f} %  ({1 / t_other:.0f} vs {1 / t_plain:.0f} img/s)")
    limit = max(args.rtol, 4 * noise) if noise is not None else args.rtol
    if diff > limit:
        print(f"{args.label}: FAIL: {diff:.2e} > {limit:.2e}")
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="vitb16")
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("compare")
    p.add_argument("plain")
    p.add_argument("other")
    p.add_argument("--reference", default=None, help="a second plain run: the kernels' run-to-run noise")
    p.add_argument("--label", default="torchrun x1 (ddp)")
    p.add_argument("--rtol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    if args.cmd == "run":
        run(args)
        return 0
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())

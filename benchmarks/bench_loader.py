"""Loader throughput per backend: decode + all views of a batch, images per second.

    python benchmarks/bench_loader.py [--images 512] [--batch 128] [--batches 6] [--workers N]

Makes a folder of 500 x 375 JPEGs (random crops of matplotlib's sample photo, ~PERF.md's
decode anchor) and times each backend available (reference, torchvision, dali) at the public
view configuration (224 px image + 8 global, 8 local views of 96 px) after one warm-up batch, on
this process's GPU when there is one. Prints one line per backend; time spent waiting on the
batch (including the GPU work, synchronised) counts.
"""
import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_backends import SAMPLE_PHOTO  # noqa: E402

from stellar.data import dali  # noqa: E402
from stellar.data.loader import build_loader  # noqa: E402


def make_folder(root, n, seed=0):
    rng = np.random.default_rng(seed)
    d = Path(root) / "train" / "photos"
    d.mkdir(parents=True)
    with Image.open(SAMPLE_PHOTO) as im:
        photo = im.convert("RGB")
    W, H = photo.size
    for i in range(n):
        w, h = int(rng.integers(W // 2, W)), int(rng.integers(H // 2, H))
        x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
        img = photo.crop((x, y, x + w, y + h)).resize((500, 375), Image.BILINEAR)
        if i % 2:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img.save(d / f"{i:05d}.jpg", quality=int(rng.integers(80, 96)))
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=3, help="timed batches after one warm-up batch")
    parser.add_argument("--workers", type=int, default=None, help="reader workers (default: the usable CPUs)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    workers = args.workers if args.workers is not None else len(__import__("os").sched_getaffinity(0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    backends = ["reference", "torchvision"] + (["dali"] if dali.dali_status()[0] else [])
    print(f"device {torch.cuda.get_device_name(0) if cuda else 'cpu'}; {workers} workers; batch {args.batch}; "
          f"224 px + 8 x 224 + 8 x 96 views; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_folder(tmp, args.images)
        for backend in backends:
            loader = build_loader(root, backend=backend, batch_size=args.batch, num_workers=workers, device=device,
                                  global_size=224, local_size=96, num_global=8, num_local=8, drop_last=True)
            it = iter(loader)
            next(it)  # warm-up: workers start, pipelines build
            if cuda:
                torch.cuda.synchronize()
            t0, n = time.perf_counter(), 0
            for _ in range(args.batches):
                try:
                    batch = next(it)
                except StopIteration:
                    it = iter(loader)
                    batch = next(it)
                n += batch["image"].shape[0]
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            print(f"{backend:12s} {n / seconds:8.1f} img/s  ({loader.describe()})")


if __name__ == "__main__":
    main()

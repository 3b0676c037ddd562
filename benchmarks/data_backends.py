"""How far each loader backend's batches are from the reference's: the decoders' difference.

    python benchmarks/data_backends.py [--batches N] [--size S]

Runs every backend available here (reference = Pillow + the PyTorch view twin; torchvision with
its CPU decoders + the op; DALI's CPU pipeline + the op; on a GPU: nvJPEG and DALI mixed) over
the same folders with the same seed, checks that the samples, crop rows and masks are identical,
and prints, per backend, the difference of the decoded pixels (8-bit levels) and of the views
(max abs, mean abs, in [0, 1] units) against the reference. Folders: the embedded shapes data
(its JPEGs) and the real-ish folder of tests/test_backends.py (photo crops as JPEG 4:2:0 / 4:4:4 /
progressive / grayscale / CMYK / EXIF-rotated, PNG RGB / RGBA / palette / 16-bit, three bad files),
plus full-size re-encodings of matplotlib's sample photo.
"""
import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_backends import SAMPLE_PHOTO, _decoded, make_realish_folder  # noqa: E402

from stellar.data import dali, decode  # noqa: E402
from stellar.data.loader import build_loader  # noqa: E402
from stellar.data.shapes import ensure_shapes_dataset  # noqa: E402


def full_size_photos(root):
    """The sample photo (600 x 512) as JPEG q75 / q95 / 4:4:4 / progressive and as PNG."""
    d = Path(root) / "train" / "photo"
    d.mkdir(parents=True)
    with Image.open(SAMPLE_PHOTO) as im:
        im = im.convert("RGB")
        im.save(d / "q75.jpg", quality=75)
        im.save(d / "q95.jpg", quality=95)
        im.save(d / "q90_444.jpg", quality=90, subsampling=0)
        im.save(d / "progressive.jpg", quality=85, progressive=True)
        im.save(d / "photo.png")
    return root


def compare(root, backends, batches, size, device):
    kw = dict(batch_size=4, num_workers=0, seed=5, drop_last=False, global_size=size, local_size=size // 2,
              num_global=2, num_local=2, patch_size=8)
    out = {}
    ref_loader = build_loader(root, backend="reference", device="cpu", **kw)
    ref = [b for _, b in zip(range(batches), ref_loader)]
    for backend in backends:
        loader = build_loader(root, backend=backend, device=device, **kw)
        got = [b for _, b in zip(range(batches), loader)]
        levels, view_max, view_sum, n = 0, 0.0, 0.0, 0
        level_sum, pixels = 0, 0
        seen = set()
        for a, b in zip(ref, got):
            for key in ("index", "crops", "keep"):
                assert torch.equal(a[key], b[key]), (backend, key)
            for f in b["index"].tolist():
                if f in seen:
                    continue
                seen.add(f)
                d = (_decoded(loader, f).int() - decode.decode_file(loader.files[f]).int()).abs()
                levels = max(levels, d.max().item())
                level_sum += d.sum().item()
                pixels += d.numel()
            for key in ("image", "global_views", "local_views"):
                d = (a[key].float() - b[key].float().cpu()).abs()
                view_max = max(view_max, d.max().item())
                view_sum += d.sum().item()
                n += d.numel()
        out[backend] = dict(files=len(seen), level_max=levels, level_mean=level_sum / max(pixels, 1),
                            view_max=view_max, view_mean=view_sum / max(n, 1))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=25)
    parser.add_argument("--size", type=int, default=64, help="global view side (local: half)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = ["torchvision"] + (["dali"] if dali.dali_status()[0] else [])
    print(f"device {device}; torch {torch.__version__}; backends vs reference: {backends}")
    with tempfile.TemporaryDirectory() as tmp:
        make_realish_folder(Path(tmp) / "realish")
        folders = {"embedded shapes (JPEG)": ensure_shapes_dataset(), "real-ish odd files": Path(tmp) / "realish"}
        if SAMPLE_PHOTO.is_file():
            folders["sample photo, 5 encodings"] = full_size_photos(Path(tmp) / "photo")
        print(f"| folder | backend | files | decoded: max / mean abs (levels) | views: max abs | views: mean abs |")
        print("|---|---|---|---|---|---|")
        for name, root in folders.items():
            for backend, r in compare(root, backends, args.batches, args.size, device).items():
                print(f"| {name} | {backend} | {r['files']} | {r['level_max']} / {r['level_mean']:.2e} | "
                      f"{r['view_max']:.2e} | {r['view_mean']:.2e} |")


if __name__ == "__main__":
    main()

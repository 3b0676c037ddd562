"""Find the images a loader cannot decode, before the first epoch: `stellar data check DIR`.

A DALI pipeline raises on one undecodable file and is unusable afterwards, and users' folders
hold such files (truncated downloads, HTML saved as .jpg). `check_images` reads every image
under a folder and writes the bad ones to a list (default `<DIR>/.stellar_bad_files.txt`,
one path per line relative to the list's folder, a tab, the reason); the loaders of
`stellar.data.gpu_loaders` read that list and skip the files on it.

What is read per file:
- always the header (PIL parses the container and the image size) and the file's tail: a JPEG
  must hold its end-of-image marker FF D9 near the end and a PNG its IEND chunk, which is what
  a truncated file lacks;
- a full decode (the decoders the loaders use: libjpeg-turbo / libpng through torchvision, PIL
  for the other formats) when the cheap checks fail or look odd, for formats other than JPEG and
  PNG, and for every file with `full=True`.
A JPEG damaged in the middle with an intact end marker passes the cheap check; the loaders
recover from those at run time (and `full=True` finds them up front).
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from stellar.data import decode as _decode

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
BAD_LIST_NAME = ".stellar_bad_files.txt"

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TAIL_BYTES = 4096  # where the end marker is looked for (some writers pad after it)


def find_images(root) -> list[Path]:
    """Every image file under `root` (by extension, case-insensitive), sorted; hidden entries skipped."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"root must be a folder of images, got {str(root)!r}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / name)
    return sorted(found)


def decode_rgb(data: torch.Tensor) -> torch.Tensor:
    """Decode encoded image bytes to RGB on the CPU: `stellar.data.decode.decode_bytes_torchvision`.

    data: uint8 Tensor[n] (a file's bytes). Returns uint8 Tensor[3, H, W] RGB, upright, as the
    reference decode gives it (16-bit -> 8-bit, every mode -> RGB, EXIF orientation); the bytes
    are screened before libpng sees them. Raises DecodeError on an undecodable image.
    """
    return _decode.decode_bytes_torchvision(data)


def check_file(path, full: bool = False) -> str | None:
    """Why `path` cannot be decoded, or None when it is fine. See the module docstring."""
    from PIL import Image

    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
        try:
            with Image.open(path) as im:
                w, h = im.size
        except Exception as e:  # noqa: BLE001 - any failure to parse the header makes the file bad
            return f"unreadable header: {e}"
        if w <= 0 or h <= 0:
            return f"bad image size {w}x{h}"
        suspicious = full
        if head.startswith(_JPEG_MAGIC):
            suspicious |= b"\xff\xd9" not in tail
        elif head.startswith(_PNG_MAGIC):
            suspicious |= b"IEND" not in tail
        else:
            suspicious = True  # uncommon formats: no cheap structural check, decode them
        if suspicious:
            from torchvision.io import read_file

            decode_rgb(read_file(str(path)))
    except Exception as e:  # noqa: BLE001 - the reason goes into the list
        return " ".join(str(e).split())[:200] or type(e).__name__
    return None


def default_list_path(root) -> Path:
    return Path(root) / BAD_LIST_NAME


def check_images(root, out=None, full: bool = False, num_workers: int | None = None) -> dict:
    """Check every image under `root`, write the bad ones to a list.

    out: the list's path (default `<root>/.stellar_bad_files.txt`); paths in it are relative to
    the list's folder when they lie under it, absolute otherwise.
    Returns dict(total=number of images, bad=[absolute paths, sorted], reasons={path: why},
    list_path=str).
    """
    files = find_images(root)
    list_path = Path(out) if out is not None else default_list_path(root)
    workers = num_workers or min(8, (os.cpu_count() or 1) * 2)  # the cheap check mostly waits on I/O
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(pool.map(lambda p: check_file(p, full=full), files))
    bad = {str(p.resolve()): r for p, r in zip(files, reasons) if r is not None}
    write_bad_list(list_path, bad, total=len(files))
    return dict(total=len(files), bad=sorted(bad), reasons=bad, list_path=str(list_path))


def write_bad_list(list_path, reasons: dict, total: int | None = None) -> None:
    """Write {absolute path: reason} as the list `read_bad_list` reads."""
    list_path = Path(list_path)
    base = list_path.parent.resolve()
    lines = [f"# stellar data check: {len(reasons)} bad" + (f" of {total} images" if total is not None else "")]
    for p in sorted(reasons):
        try:
            shown = str(Path(p).relative_to(base))
        except ValueError:
            shown = p
        lines.append(f"{shown}\t{reasons[p]}")
    list_path.parent.mkdir(parents=True, exist_ok=True)
    list_path.write_text("\n".join(lines) + "\n")


def read_bad_list(list_path) -> set[str]:
    """The absolute paths named in a list written by `check_images` (empty set if there is none)."""
    list_path = Path(list_path)
    if not list_path.is_file():
        return set()
    base = list_path.parent.resolve()
    bad = set()
    for line in list_path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name = line.split("\t", 1)[0]
        bad.add(str((base / name).resolve()))
    return bad


def main(argv=None) -> int:
    """`stellar data check DIR [--out FILE] [--full] [--workers N]`."""
    parser = argparse.ArgumentParser(prog="stellar data check", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="folder of images (searched recursively)")
    parser.add_argument("--out", default=None, help=f"where the list goes (default DIR/{BAD_LIST_NAME})")
    parser.add_argument("--full", action="store_true", help="fully decode every image (slow, finds more)")
    parser.add_argument("--workers", type=int, default=None, help="threads (default 2 per core, at most 8)")
    args = parser.parse_args(argv)
    result = check_images(args.dir, out=args.out, full=args.full, num_workers=args.workers)
    print(f"{result['total']} images, {len(result['bad'])} bad; list written to {result['list_path']}")
    for p in result["bad"]:
        print(f"  {p}: {result['reasons'][p]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

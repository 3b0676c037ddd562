"""A dataset over any folder of images, with robust decoding.

`ImageFolderDataset(root, split=None)` reads `root[/split]/<class>/*.jpg|png|...` (class
subfolders optional: files directly under the folder get label 0 when there are no class
subfolders, and class subfolders are labelled in sorted order). Every image comes out as uint8 RGB
`Tensor[3, H, W]`: grayscale, LA, palette, RGBA (alpha dropped), 16-bit and 32-bit integer
grayscale (scaled from 0..65535), float, CMYK and YCbCr images are converted; EXIF orientation
is applied. A file that cannot be decoded (corrupt, truncated, not an image) is skipped: the
next index (cyclically) is loaded in its place, and its path is recorded.

DataLoader workers are separate processes, so the record kept in a worker never reaches the
main process by itself: `load(index)` returns the bad paths met along with the sample, and the
loader (`stellar.data.loader`) gathers them; `skipped` / `bad_paths` here count what this
process saw.
"""
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


def decode_image(path: Union[str, Path]) -> torch.Tensor:
    """Decode one file to uint8 RGB Tensor[3, H, W]; raises on a corrupt or truncated file."""
    with Image.open(path) as img:
        img.load()  # decodes fully: truncated data raises here
        img = ImageOps.exif_transpose(img)
        mode = img.mode
        if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
            # 16-bit grayscale PNGs open as I or I;16: scale 0..65535 to 0..255 (convert() clips)
            arr = np.asarray(img).astype(np.float64)
            arr = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
            arr = np.repeat(arr[..., None], 3, axis=2)
        elif mode == "F":
            arr = np.asarray(img, dtype=np.float64)
            scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
            arr = np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8)
            arr = np.repeat(arr[..., None], 3, axis=2)
        else:
            if mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise OSError(f"decoded an empty image from {path}")
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def list_images(folder: Path, exts: Sequence[str]) -> Tuple[List[Path], List[int], List[str]]:
    """Sorted image files under `folder` and their labels (class subfolders optional).

    Returns (paths, labels, classes). Class subfolders (holding images at any depth) are
    labelled by sorted name; loose files directly in `folder` get label 0 when there are no
    class subfolders, and are an error when there are (the layout would be ambiguous).
    """
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in exts)

    def is_image(p: Path) -> bool:
        name = p.name.lower()
        return p.is_file() and name.endswith(exts) and not name.startswith(".")

    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = sorted(p for p in folder.iterdir() if is_image(p))
    paths, labels = [], []
    kept = []
    for c in classes:
        files = sorted(p for p in (folder / c).rglob("*") if is_image(p))
        if files:
            kept.append(c)
            paths.extend(files)
            labels.extend([len(kept) - 1] * len(files))
    if kept and loose:
        raise ValueError(f"root {folder} mixes loose images ({loose[0].name}, ...) with class subfolders")
    if not kept:
        paths, labels = loose, [0] * len(loose)
    return paths, labels, kept


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images under `root` (or `root/split`), class subfolders optional.

    root: folder; split: optional subfolder ("train", "val"); exts: file extensions to read.
    `dataset[i]` -> (uint8 Tensor[3, H, W], label int). `classes` lists the class names
    ([] without subfolders), `paths` / `labels` the files. Undecodable files are skipped (the
    next index stands in) and recorded in `bad_paths` / `skipped` (this process only).
    """

    def __init__(self, root: Union[str, Path], split: Optional[str] = None, exts: Sequence[str] = IMAGE_EXTS):
        root = Path(root).expanduser()
        folder = root / split if split else root
        if not folder.is_dir():
            raise ValueError(f"root {folder} is not a folder" + (f" (split={split!r})" if split else ""))
        self.root = folder
        self.paths, self.labels, self.classes = list_images(folder, exts)
        if not self.paths:
            raise ValueError(f"root {folder} holds no images with extensions {tuple(exts)}")
        self._bad = {}  # index -> path, in this process

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def bad_paths(self) -> List[str]:
        return sorted(self._bad.values())

    @property
    def skipped(self) -> int:
        return len(self._bad)

    def load(self, index: int) -> Tuple[torch.Tensor, int, List[str]]:
        """(image uint8 Tensor[3, H, W], label, bad paths met) for `index`, skipping bad files."""
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        met = []
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                met.append(self._bad[i])
                continue
            try:
                return decode_image(self.paths[i]), self.labels[i], met
            except Exception:  # noqa: BLE001  any decoder failure means "skip this file"
                self._bad[i] = str(self.paths[i])
                met.append(self._bad[i])
        raise RuntimeError(f"root {self.root}: none of the {n} images could be decoded")

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        image, label, _ = self.load(index)
        return image, label

    def verify(self) -> List[str]:
        """Decode every file once; returns the bad paths (also recorded in `bad_paths`)."""
        for i in range(len(self.paths)):
            if i not in self._bad:
                try:
                    decode_image(self.paths[i])
                except Exception:  # noqa: BLE001
                    self._bad[i] = str(self.paths[i])
        return self.bad_paths

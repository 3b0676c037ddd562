"""A dataset over any folder of images, with robust decoding.

`ImageFolderDataset(root, split=None)` reads `root[/split]/<class>/*.jpg|png|...` (class
subfolders optional: files directly under the folder get label 0 when there are no class
subfolders, and class subfolders are labelled in sorted order). Every image comes out as uint8 RGB
`Tensor[3, H, W]` by the reference decode, `stellar.data.decode.decode_file` (every mode to
8-bit RGB, 16-bit samples by their high byte, EXIF orientation applied: see there). A file that cannot be decoded (corrupt, truncated, not an image) is skipped: the
next index (cyclically) is loaded in its place, and its path is recorded.

DataLoader workers are separate processes, so the record kept in a worker never reaches the
main process by itself: `load(index)` returns the bad paths met along with the sample, and the
loader (`stellar.data.loader`) gathers them; `skipped` / `bad_paths` here count what this
process saw.
"""
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

from stellar.data import decode as _decode

IMAGE_EXTS = _decode.IMAGE_EXTS  # the formats the decoders know


def decode_image(path: Union[str, Path]) -> torch.Tensor:
    """Decode one file to uint8 RGB Tensor[3, H, W]; raises DecodeError (an OSError) on a bad file.

    The reference decode, `stellar.data.decode.decode_file` (modes, 16-bit, EXIF: see there).
    """
    return _decode.decode_file(path)


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

"""Python entry points of the compiled ops in stellar._C (csrc/).

`multicrop` calls `torch.ops.stellar.multicrop`; its fake (meta) implementation is registered
with `torch.library.register_fake` when the extension loads (at `import stellar` when it is
built, see stellar/__init__.py), so `torch.compile` traces through the op without running it.
The plain PyTorch twin is `stellar.data.augment.apply_crops`.
"""
from typing import Optional, Sequence

import torch

from stellar import _ext

_registered = False


def _fake_multicrop(images, crops, size, dtype=None, normalize=True):
    device = images[0].device if len(images) else crops.device
    return crops.new_empty((crops.shape[0], 3, size, size), dtype=dtype or torch.float32, device=device)


def _ensure_loaded():
    """Load stellar._C and register the fake implementation once (raises ExtensionError)."""
    global _registered
    _ext.load()
    if not _registered:
        torch.library.register_fake("stellar::multicrop")(_fake_multicrop)
        _registered = True


def load_if_built() -> bool:
    """_ensure_loaded() where stellar._C is built for this torch; False (nothing raised) where it
    is not: `multicrop` and `_ext.load()` raise that error, with how to rebuild, when used."""
    try:
        _ensure_loaded()
    except _ext.ExtensionError:
        return False
    return True


def multicrop(
    images: Sequence[torch.Tensor],
    crops: torch.Tensor,
    size: int,
    dtype: Optional[torch.dtype] = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Crop, resize, flip, colour-augment, blur and normalize one view per row, fused.

    images: N uint8 Tensor[H_i, W_i, 3] (HWC RGB, any strides: a decoded CHW image works as
        `image.permute(1, 2, 0)` without a copy), all on one device (CPU or CUDA).
    crops: float32 Tensor[K, 12] rows of docs/design.md (`stellar.data.augment.COLS`), on the
        CPU or on the images' device. Every row is checked (image index in range, finite values,
        sizes >= 1, ...; the error names the row and column): CPU rows on the host, device rows
        by a kernel on the device whose verdict the op then reads back, its one stream
        synchronisation (give CPU rows to avoid it).
    size: output side. dtype: float32 (default), bfloat16 or float16.
    normalize: ImageNet mean/std at the end (default); False leaves the views in [0, 1].
    Returns Tensor[K, 3, size, size] on the images' device: the same math as
    `apply_crops(images_chw, crops, size, normalize)`, made by one CUDA launch (two when a row
    blurs) on the current stream, or by at::parallel_for over the rows on the CPU.
    """
    _ensure_loaded()
    return torch.ops.stellar.multicrop(list(images), crops, size, dtype, normalize)


# Last line: `import stellar.ops` before torch ran torch's import hook (stellar/__init__.py) above;
# the ops it registers need this module whole.
__import__("stellar")._register_when_whole(__name__)

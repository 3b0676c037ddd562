"""STELLAR's 17 views of a batch made by the fused op (`torch.ops.stellar.multicrop`).

`MultiCrop` draws the crop rows of a batch on the CPU (`sample_multicrop_params`, a seeded
generator offset by the rank), then makes every view of one output size with one call of the
op on the images' device: one call for `image` + the global views, one for the local views.
The plain PyTorch twin, `stellar.data.augment.apply_crops`, runs when asked for
(backend="reference"), or under backend="auto" with a warning where stellar._C is missing.
"""
import warnings
from typing import Optional, Sequence

import torch

from stellar import _ext
from stellar.data.augment import apply_crops, sample_multicrop_params

_BACKENDS = ("auto", "op", "reference")


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class MultiCrop:
    """Make the batch dict of docs/design.md from decoded images, with the crop rows used.

    global_size, local_size: output sides (224, 96). num_global, num_local: views per image
    (8, 8). global_scale, local_scale, ratio: RandomResizedCrop ranges. seed: the generator
    seed; the generator is seeded with `seed + rank` (torch.distributed's rank, or `rank`) so
    ranks draw different crops. dtype: output dtype (float32, bfloat16, float16).
    normalize: False (the default, as loaders need) leaves the views in [0, 1].
    backend: "op" (the default: the C++/CUDA op; a missing or stale build raises), "reference"
    (apply_crops, CPU) or "auto" (the op where stellar._C loads, else the reference with a
    warning that names why the build is missing: never a silent fallback). color_kwargs go to `sample_crop_params`
    (jitter_p, brightness, ..., blur_sigma).
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        num_global: int = 8,
        num_local: int = 8,
        global_scale: Sequence[float] = (0.36, 1.0),
        local_scale: Sequence[float] = (0.06, 0.36),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        seed: int = 0,
        rank: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        normalize: bool = False,
        backend: str = "op",
        **color_kwargs,
    ):
        for name, value in (("global_size", global_size), ("local_size", local_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("num_global", num_global), ("num_local", num_local)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if backend == "op":
            _ext.load()  # raises a clear error when stellar._C is missing or stale
        self.global_size, self.local_size = global_size, local_size
        self.num_global, self.num_local = num_global, num_local
        self.global_scale, self.local_scale, self.ratio = global_scale, local_scale, ratio
        self.dtype, self.normalize, self.backend = dtype, normalize, backend
        self.color_kwargs = color_kwargs
        self.rank = _rank() if rank is None else int(rank)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed + self.rank)

    def state_dict(self) -> dict:
        """The generator state, so a resumed run draws the same crops."""
        return {"seed": self.seed, "rank": self.rank, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def _use_op(self) -> bool:
        if self.backend != "auto":
            return self.backend == "op"
        if _ext.is_available():
            return True
        if not getattr(self, "_warned", False):
            self._warned = True
            warnings.warn(
                f"MultiCrop(backend='auto'): stellar._C is not usable ({_ext.extension_info()['error']}); "
                "falling back to the PyTorch reference on the CPU (several times slower). Build the "
                "extension with `pip install --no-build-isolation -e .`, or pass backend='reference' "
                "to choose the reference knowingly.", RuntimeWarning, stacklevel=3)
        return False

    def _views(self, hwc, rows, size) -> torch.Tensor:
        """hwc: list of uint8 Tensor[H, W, 3]; rows: Tensor[K, 12] -> Tensor[K, 3, size, size]."""
        if self._use_op():
            from stellar.ops import multicrop

            return multicrop(hwc, rows, size, dtype=self.dtype, normalize=self.normalize)
        chw = [im.permute(2, 0, 1).cpu() for im in hwc]
        out = apply_crops(chw, rows, size, normalize=self.normalize)
        return out.to(device=hwc[0].device if hwc else "cpu", dtype=self.dtype)

    def __call__(self, images: Sequence[torch.Tensor], labels: Optional[torch.Tensor] = None,
                 layout: str = "CHW") -> dict:
        """Make all views of a batch.

        images: B uint8 Tensor[3, H_i, W_i] (layout "CHW", torchvision's decode) or
            Tensor[H_i, W_i, 3] (layout "HWC", DALI's), all on one device; sizes may differ.
        labels: optional Tensor[B], passed through as "label".
        Returns {"image": [B, 3, S, S], "global_views": [B, G, 3, S, S],
        "local_views": [B, Lc, 3, s, s], "label": [B] (when given), "crops": [B * (1 + G + Lc), 12]}
        on the images' device (crops on the CPU): `crops` holds the rows of `image` (B), then
        the global views (image-major: row B + i * G + v is view v of image i), then the local
        views (B + B * G + i * Lc + v). The first global view is `image`'s window and flip with
        its own colour augmentation.
        """
        if layout not in ("CHW", "HWC"):
            raise ValueError(f"layout must be 'CHW' or 'HWC', got {layout!r}")
        images = list(images)
        if not images:
            raise ValueError("images must hold at least one image")
        for i, im in enumerate(images):
            ok = isinstance(im, torch.Tensor) and im.dtype == torch.uint8 and im.dim() == 3
            ok = ok and im.shape[0 if layout == "CHW" else 2] == 3
            if not ok:
                what = f"{im.dtype} {tuple(im.shape)}" if isinstance(im, torch.Tensor) else type(im).__name__
                expect = "[3, H, W]" if layout == "CHW" else "[H, W, 3]"
                raise ValueError(f"images[{i}] must be a uint8 Tensor{expect} (layout {layout}), got {what}")
        hwc = [im.permute(1, 2, 0) if layout == "CHW" else im for im in images]
        sizes = [(int(im.shape[0]), int(im.shape[1])) for im in hwc]
        B, G, Lc = len(images), self.num_global, self.num_local
        rows = sample_multicrop_params(
            sizes, self.generator, num_global=G, num_local=Lc, global_scale=self.global_scale,
            local_scale=self.local_scale, ratio=self.ratio, **self.color_kwargs,
        )
        big = self._views(hwc, torch.cat([rows["image"], rows["global"]]), self.global_size)
        S, s = self.global_size, self.local_size
        batch = {
            "image": big[:B],
            "global_views": big[B:].view(B, G, 3, S, S),
            "local_views": self._views(hwc, rows["local"], s).view(B, Lc, 3, s, s),
        }
        if labels is not None:
            batch["label"] = labels
        batch["crops"] = torch.cat([rows["image"], rows["global"], rows["local"]])
        return batch

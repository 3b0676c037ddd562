"""The view step: decoded images + the samples' draws -> the batch's views, the same for every backend.

    images (uint8 [H_i, W_i, 3], on the CPU or a GPU)
      + draws (stellar.data.draws: crop-row uniforms and kept patches, per sample)
      -> crops [K, 12] (rows for the images' sizes) -> image, global_views, local_views

`views` picks how the views are made, and only that: "op" (the fused C++/CUDA op,
`stellar.ops.multicrop`, on the images' device), "torch" (its plain PyTorch twin,
`stellar.data.augment.apply_crops`, on the CPU: the oracle), or "auto" (the op where `stellar._C`
is usable for the images' device, else the twin with a warning that says why). A backend (where
bytes become pixels: `stellar.data.loader`) never changes what is computed here.

`MultiCrop` is the same step for images you hold yourself (no loader): it draws each image's
rows and masks from (seed, epoch, position) like a loader does.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch

from stellar import _ext
from stellar.data.augment import apply_crops
from stellar.data.draws import SampleDraws, crop_rows, draw_samples
from stellar.data.spec import ViewSpec

__all__ = ["VIEW_IMPLS", "resolve_views", "make_views", "make_batch", "MultiCrop"]

VIEW_IMPLS = ("op", "torch", "auto")
_REBUILD_CUDA = ("rebuild it on a machine with the CUDA toolkit: `STELLAR_FORCE_CUDA=1 pip install "
                 "--no-build-isolation --no-deps -e .`, or make the views with views='torch' (slow)")


def resolve_views(views: str, device: torch.device | str | None = None) -> str:
    """"op" or "torch" for images on `device`; raises now (not mid-epoch) when "op" cannot run there.

    "op" raises the extension's error when `stellar._C` is missing or stale, and a RuntimeError
    with the fix when it was built without CUDA and `device` is a GPU. "auto" warns instead and
    returns "torch".
    """
    if views not in VIEW_IMPLS:
        raise ValueError(f"views must be one of {VIEW_IMPLS}, got {views!r}")
    if views == "torch":
        return "torch"
    cuda = device is not None and torch.device(device).type == "cuda"
    reason = None
    if not _ext.is_available():
        if views == "op":
            _ext.load()  # raises the ExtensionError that says what is wrong and how to rebuild
        reason = f"stellar._C is not usable ({_ext.extension_info()['error']})"
    elif cuda and not _ext.extension_info().get("cuda"):
        reason = "stellar._C was built without CUDA, and the images are on a GPU"
        if views == "op":
            raise RuntimeError(f"views='op': {reason}: {_REBUILD_CUDA}")
    if reason is None:
        return "op"
    warnings.warn(f"views='auto': {reason}; making the views with the PyTorch reference on the CPU (several "
                  "times slower). Build the extension with `pip install --no-build-isolation --no-deps -e .`, or "
                  "pass views='torch' to choose the reference knowingly.", RuntimeWarning, stacklevel=2)
    return "torch"


def _views_of(hwc: list, rows: torch.Tensor, size: int, impl: str, dtype: torch.dtype, normalize: bool) -> torch.Tensor:
    """hwc: uint8 Tensor[H_i, W_i, 3] each; rows: Tensor[K, 12] -> Tensor[K, 3, size, size] on their device."""
    if impl == "op":
        from stellar.ops import multicrop

        return multicrop(hwc, rows, size, dtype=dtype, normalize=normalize)
    out = apply_crops([im.permute(2, 0, 1).cpu() for im in hwc], rows, size, normalize=normalize)
    return out.to(device=hwc[0].device, dtype=dtype)


def make_views(images: Sequence[torch.Tensor], crops: torch.Tensor, spec: ViewSpec, impl: str,
               normalize: bool = False) -> dict:
    """The views of B images from their crop rows (`stellar.data.draws` layout).

    images: B uint8 Tensor[H_i, W_i, 3] on one device; crops: Tensor[B * (1 + G + Lc), 12] (CPU);
    impl: "op" or "torch" (`resolve_views`). Returns {"image": [B, 3, S, S], "global_views":
    [B, G, 3, S, S], "local_views": [B, Lc, 3, s, s]} of `spec.dtype` on the images' device,
    in [0, 1] unless `normalize` (ImageNet mean/std).
    """
    B, G, Lc, S, s = len(images), spec.num_global, spec.num_local, spec.global_size, spec.local_size
    dtype = spec.torch_dtype
    big = _views_of(list(images), crops[: B * (1 + G)], S, impl, dtype, normalize)
    local = _views_of(list(images), crops[B * (1 + G):], s, impl, dtype, normalize)
    return {"image": big[:B], "global_views": big[B:].view(B, G, 3, S, S), "local_views": local.view(B, Lc, 3, s, s)}


def make_batch(images: Sequence[torch.Tensor], draws: SampleDraws, spec: ViewSpec, impl: str,
               normalize: bool = False) -> dict:
    """`make_views` of the rows `draws` gives for these images, plus {"crops": [K, 12], "keep":
    LongTensor[B, G, n_keep]} (both on the CPU)."""
    crops = crop_rows(spec, draws, [(int(im.shape[0]), int(im.shape[1])) for im in images])
    return {**make_views(images, crops, spec, impl, normalize), "crops": crops, "keep": draws.keep}


def _hwc_images(images, layout: str) -> list:
    """The images as a list of uint8 Tensor[H, W, 3] views (no copy); a ValueError naming the bad one."""
    if layout not in ("CHW", "HWC"):
        raise ValueError(f"layout must be 'CHW' or 'HWC', got {layout!r}")
    images = list(images)
    if not images:
        raise ValueError("images must hold at least one image")
    for i, im in enumerate(images):
        ok = isinstance(im, torch.Tensor) and im.dtype == torch.uint8 and im.dim() == 3
        ok = ok and im.shape[0 if layout == "CHW" else 2] == 3 and im.device == images[0].device
        if not ok:
            what = f"{im.dtype} {tuple(im.shape)} on {im.device}" if isinstance(im, torch.Tensor) else type(im).__name__
            expect = "[3, H, W]" if layout == "CHW" else "[H, W, 3]"
            raise ValueError(f"images[{i}] must be a uint8 Tensor{expect} (layout {layout}) on the device of "
                             f"images[0], got {what}")
    return [im.permute(1, 2, 0) if layout == "CHW" else im for im in images]


class MultiCrop:
    """STELLAR's views of a batch of images you already decoded, with the rows and masks used.

    spec: a ViewSpec (default ViewSpec()); `spec_fields` override its fields
    (`MultiCrop(global_size=16, num_global=3, dtype=torch.bfloat16)`). seed: the draws' seed.
    views: "op" (default; a missing or stale build raises), "torch" or "auto" (`resolve_views`).
    normalize: False (the default, as the model wants) leaves the views in [0, 1].
    Each image's rows and masks are drawn from (seed, epoch, position) as a loader draws them;
    positions default to a running count of the images this MultiCrop has seen, so successive
    calls draw fresh views.
    """

    def __init__(self, spec: Optional[ViewSpec] = None, *, seed: int = 0, views: str = "op", normalize: bool = False,
                 **spec_fields):
        self.spec = (spec or ViewSpec()).replace(**spec_fields) if spec_fields else (spec or ViewSpec())
        if views not in VIEW_IMPLS:
            raise ValueError(f"views must be one of {VIEW_IMPLS}, got {views!r}")
        if views == "op":
            _ext.load()  # raises a clear error when stellar._C is missing or stale
        self.views, self.seed, self.normalize = views, int(seed), bool(normalize)
        self.count = 0  # images seen: the next call's default positions start here
        self._impl = {}  # device type -> "op" | "torch", resolved once

    def __call__(self, images: Sequence[torch.Tensor], labels: Optional[torch.Tensor] = None, *, layout: str = "CHW",
                 epoch: int = 0, positions: Optional[Sequence[int]] = None) -> dict:
        """Make all views of a batch.

        images: B uint8 Tensor[3, H_i, W_i] (layout "CHW", torchvision's decode) or
            Tensor[H_i, W_i, 3] (layout "HWC", DALI's), all on one device; sizes may differ.
        labels: optional Tensor[B], passed through as "label". epoch, positions: the draws' key.
        Returns {"image": [B, 3, S, S], "global_views": [B, G, 3, S, S], "local_views":
        [B, Lc, 3, s, s]} on the images' device, "crops" [K, 12] and "keep" [B, G, n_keep] on the
        CPU (layouts: `stellar.data.draws`), and "label" when given. The first global view is
        `image`'s window and flip with its own colour augmentation.
        """
        hwc = _hwc_images(images, layout)
        B = len(hwc)
        if positions is None:
            positions = range(self.count, self.count + B)
        positions = [int(p) for p in positions]
        if len(positions) != B:
            raise ValueError(f"positions must hold one position per image ({B}), got {len(positions)}")
        self.count += B
        device = hwc[0].device
        if device.type not in self._impl:
            self._impl[device.type] = resolve_views(self.views, device)
        batch = make_batch(hwc, draw_samples(self.spec, self.seed, int(epoch), positions), self.spec,
                           self._impl[device.type], self.normalize)
        if labels is not None:
            batch["label"] = labels
        return batch

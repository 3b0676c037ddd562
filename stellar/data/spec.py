"""What a batch holds, fixed once: `ViewSpec`, the one description of STELLAR's views and masks.

Every loader backend, the view step (`stellar.data.multicrop`) and the per-sample draws
(`stellar.data.draws`) read their sizes, counts, crop ranges, colour probabilities and mask
parameters from one `ViewSpec`. It is validated when it is made (each bad field raises a
ValueError naming it) and nowhere else. `ViewSpec.from_config(cfg)` builds it from a run's
config: `cfg["data"]` (views) and `cfg["model"]` (the patch size and `model.masking`), so that
the kept patches a loader draws (`batch["keep"]`) always have the shape the model expects.

This module imports nothing else of `stellar.data`: it is the top of the package's one
direction, spec/order -> draws -> decode -> views -> loader.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

__all__ = ["ViewSpec", "VIEW_DTYPES"]

# the dtypes the view step writes (the op writes them directly; its PyTorch twin casts at the end)
VIEW_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FOCAL = (None, "gaussian", "block")


def _int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _prob(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def _pair(name, value, low, high=math.inf):
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok or not (low <= float(value[0]) <= float(value[1]) <= high):
        raise ValueError(f"{name} must be a (low, high) pair with {low} <= low <= high <= {high}, got {value!r}")
    return (float(value[0]), float(value[1]))


@dataclass(frozen=True)
class ViewSpec:
    """The views of one sample and the patches its masked views keep (STELLAR.md section 5).

    Views: `image` (global_size, no colour), `num_global` masked global views (global_size; the
    first shares `image`'s window and flip) and `num_local` local views (local_size), each a
    RandomResizedCrop (scale, ratio) with flip `flip_p`; every coloured view draws its own
    jitter (`jitter_p`; brightness, contrast, saturation factors in [1-x, 1+x], hue shift in
    [-hue, hue]), grayscale (`grayscale_p`) and blur (`blur_p`, sigma in `blur_sigma`).
    Masks: each masked global view keeps `n_keep = int(grid * grid * (1 - mask_ratio))` patches
    of its `grid x grid` patch grid (grid = global_size // patch_size), with the `focal` bias
    ("gaussian", "block" or None) applied with probability `focal_prob` per view
    (`stellar.model.masking.sample_keep_indices`).
    dtype: the views' dtype, "float32" or "bfloat16" (views are in [0, 1] either way).
    """

    global_size: int = 224
    local_size: int = 96
    num_global: int = 8
    num_local: int = 8
    global_scale: tuple = (0.36, 1.0)
    local_scale: tuple = (0.06, 0.36)
    ratio: tuple = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple = (0.1, 2.0)
    patch_size: int = 16
    mask_ratio: float = 0.8
    focal: Any = "gaussian"
    focal_prob: float = 0.5
    dtype: str = "float32"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: normalise once here)
        _int("global_size", self.global_size, 1)
        _int("local_size", self.local_size, 1)
        _int("num_global", self.num_global, 0)
        _int("num_local", self.num_local, 0)
        _int("patch_size", self.patch_size, 1)
        set_("global_scale", _pair("global_scale", self.global_scale, 0.0))
        set_("local_scale", _pair("local_scale", self.local_scale, 0.0))
        set_("ratio", _pair("ratio", self.ratio, 1e-12))
        set_("blur_sigma", _pair("blur_sigma", self.blur_sigma, 1e-12))
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "focal_prob"):
            _prob(name, getattr(self, name))
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a non-negative number (factors in [1-x, 1+x]), got {v!r}")
        if isinstance(self.hue, bool) or not isinstance(self.hue, (int, float)) or not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue!r}")
        for name in ("global_size", "local_size"):
            if getattr(self, name) % self.patch_size:
                raise ValueError(f"{name} ({getattr(self, name)}) must be a multiple of the patch size "
                                 f"({self.patch_size}): the encoder cuts views into whole patches")
        focal = None if self.focal in ("none", "None") else self.focal
        if focal not in FOCAL:
            raise ValueError(f"focal must be one of {FOCAL}, got {self.focal!r}")
        set_("focal", focal)
        if isinstance(self.dtype, torch.dtype):
            names = {v: k for k, v in VIEW_DTYPES.items()}
            if self.dtype not in names:
                raise ValueError(f"dtype must be one of {sorted(VIEW_DTYPES)}, got {self.dtype}")
            set_("dtype", names[self.dtype])
        if self.dtype not in VIEW_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(VIEW_DTYPES)}, got {self.dtype!r}")
        if isinstance(self.mask_ratio, bool) or not isinstance(self.mask_ratio, (int, float)) \
                or not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio!r}")
        if self.n_keep < 1:
            raise ValueError(f"mask_ratio={self.mask_ratio} keeps no patch of the {self.grid}x{self.grid} grid")

    # -- derived -----------------------------------------------------------------------------
    @property
    def grid(self) -> int:
        """Patches per side of a masked global view."""
        return self.global_size // self.patch_size

    @property
    def n_keep(self) -> int:
        """Patches each masked view keeps: int(N * (1 - mask_ratio)), the public code's count."""
        return int(self.grid * self.grid * (1 - self.mask_ratio))

    @property
    def views_per_sample(self) -> int:
        """Crop rows per sample: `image`, the global views, the local views."""
        return 1 + self.num_global + self.num_local

    @property
    def torch_dtype(self) -> torch.dtype:
        return VIEW_DTYPES[self.dtype]

    @property
    def color_kwargs(self) -> dict:
        """The colour and flip probabilities, as `stellar.data.augment` takes them."""
        names = ("flip_p", "jitter_p", "brightness", "contrast", "saturation", "hue", "grayscale_p", "blur_p", "blur_sigma")
        return {k: getattr(self, k) for k in names}

    def replace(self, **changes) -> "ViewSpec":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # -- from a run's config -------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Mapping) -> "ViewSpec":
        """The spec of a run: views from `cfg["data"]`, patch size and masking from `cfg["model"]`.

        cfg: the merged run config (`stellar.train.load_config`). `data.color` holds the colour
        probabilities; keys missing from an older config take the defaults above.
        """
        from stellar.model import resolve_config

        data = dict(cfg.get("data") or {})
        model = resolve_config(cfg.get("model"))
        color = dict(data.get("color") or {})
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in color if k not in fields)
        if unknown:
            raise ValueError(f"unknown data.color keys: {unknown}")
        view_keys = ("global_size", "local_size", "num_global", "num_local", "global_scale", "local_scale",
                     "ratio", "flip_p", "dtype")
        kw = {k: (tuple(data[k]) if isinstance(data[k], list) else data[k]) for k in view_keys if k in data}
        kw.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in color.items()})
        masking = model["masking"]
        return cls(**kw, patch_size=int(model["patch_size"]), mask_ratio=masking["mask_ratio"],
                   focal=masking["focal"], focal_prob=masking["focal_prob"])

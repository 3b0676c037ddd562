"""The multi-crop augmentation in plain PyTorch: the reference (and CPU path) of the fused op.

Parameters are drawn separately from their application, so that the same rows can be fed to
this reference and to the fused C++/CUDA op (`torch.ops.stellar.multicrop`) and compared.

The crop row (`Tensor[K, 12]`, float32, one row per output crop; `COLS` names the columns):

    col  name         meaning
    0    image_index  which source image of the batch (index into `images`)
    1    y0           top of the crop window, integer pixels of the source image
    2    x0           left of the crop window, integer pixels of the source image
    3    h            window height, integer pixels (>= 1; may reach past the image)
    4    w            window width, integer pixels (>= 1; may reach past the image)
    5    flip         1 = horizontal flip of the resized crop, 0 = none
    6    brightness   factor, 1 = unchanged
    7    contrast     factor, 1 = unchanged
    8    saturation   factor, 1 = unchanged
    9    hue          shift in [-0.5, 0.5] (fraction of the hue circle), 0 = unchanged
    10   grayscale    1 = convert to 3-channel grayscale, 0 = none
    11   blur_sigma   Gaussian blur sigma (kernel 9x9), 0 = no blur

`apply_crops` runs, per row and in this fixed order, each with the semantics of the
same-named `torchvision.transforms.v2.functional` op on float images:

    resized_crop (bilinear, antialias=False, align_corners=False) -> hflip
    -> adjust_brightness -> adjust_contrast -> adjust_saturation -> adjust_hue
    -> rgb_to_grayscale(num_output_channels=3) -> gaussian_blur(kernel 9, reflect padding)
    -> normalize(ImageNet mean/std)   [optional]

Differences from the torchvision chain, all deliberate:
- Window pixels outside the image read the nearest edge pixel (border replicate) instead of
  torchvision's zero padding, so a window larger than a small image still yields a crop.
- torchvision's `ColorJitter` applies brightness/contrast/saturation/hue in a random order
  per call; the fused op uses the fixed order above so that one row fully describes a crop.
- torchvision runs `adjust_hue` in float32 whatever the input dtype; here it runs in the
  working dtype (so float64 is float64 throughout).
- A step whose row value means "unchanged" (hue 0, grayscale 0, blur_sigma 0) is skipped;
  brightness / contrast / saturation 1 are exact identities of the blend anyway.
"""
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from stellar.constants import IMAGENET_MEAN, IMAGENET_STD

COLS = (
    "image_index",
    "y0",
    "x0",
    "h",
    "w",
    "flip",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "grayscale",
    "blur_sigma",
)
NUM_COLS = len(COLS)
(IMAGE_INDEX, Y0, X0, H, W, FLIP, BRIGHTNESS, CONTRAST, SATURATION, HUE, GRAYSCALE, BLUR_SIGMA) = range(
    NUM_COLS
)

BLUR_KERNEL = 9
# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)

_TRIES = 10  # RandomResizedCrop tries before the central fallback


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
# Each view's row is a function of 31 uniforms in [0, 1) and the source size, so that the draws
# of one sample can come from a generator of its own (`stellar.data.draws`: seeded by the
# sample's (seed, epoch, position)) while the rows of a whole batch are computed at once.
# Uniforms of one view, in order: 10 window areas, 10 log aspect ratios, y, x (the window's
# place), flip, then the colour draws: jitter on/off, brightness, contrast, saturation, hue,
# grayscale on/off, blur on/off, blur sigma.
U_AREA, U_LOG_RATIO = slice(0, _TRIES), slice(_TRIES, 2 * _TRIES)
U_Y, U_X, U_FLIP, U_JITTER, U_BRIGHTNESS, U_CONTRAST, U_SATURATION, U_HUE, U_GRAY, U_BLUR, U_SIGMA = range(
    2 * _TRIES, 2 * _TRIES + 11
)
NUM_UNIFORMS = 2 * _TRIES + 11


def _check_range(name, value, low_ok=0.0):
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"{name} must be a (low, high) pair, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not (low_ok <= lo <= hi):
        raise ValueError(f"{name} must satisfy {low_ok} <= low <= high, got {value!r}")
    return lo, hi


def _between(u, lo, hi):
    return lo + (hi - lo) * u


def windows_from_uniforms(u, heights, widths, scale, ratio):
    """RandomResizedCrop windows, one per row of `u`, with torchvision's semantics.

    u: Tensor[K, >= 22] float64 uniforms (columns U_AREA, U_LOG_RATIO, U_Y, U_X used);
    heights, widths: LongTensor[K] source sizes. Up to 10 tries of area ~ U(scale) * H * W and
    log aspect ~ U(log ratio); the first try that fits inside the image wins, else the central
    crop clipped to `ratio` (torchvision's fallback).
    Returns (y0, x0, h, w), each LongTensor[K]; windows always lie inside the image.
    """
    Hf, Wf = heights.double(), widths.double()
    area = (Hf * Wf)[:, None]
    target = area * _between(u[:, U_AREA], scale[0], scale[1])
    aspect = torch.exp(_between(u[:, U_LOG_RATIO], math.log(ratio[0]), math.log(ratio[1])))
    w_try = torch.round(torch.sqrt(target * aspect)).long()
    h_try = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w_try > 0) & (w_try <= widths[:, None]) & (h_try > 0) & (h_try <= heights[:, None])
    first = ok.int().argmax(dim=1, keepdim=True)  # first fitting try (0 when none fits)
    any_ok = ok.any(dim=1)
    h = h_try.gather(1, first)[:, 0]
    w = w_try.gather(1, first)[:, 0]

    # Central fallback, clipped to the ratio range.
    in_ratio = Wf / Hf
    fb_h = torch.where(in_ratio < ratio[0], torch.round(Wf / ratio[0]).long(), heights)
    fb_w = torch.where(in_ratio > ratio[1], torch.round(Hf * ratio[1]).long(), widths)
    fb_h = fb_h.clamp(1, None).minimum(heights)
    fb_w = fb_w.clamp(1, None).minimum(widths)

    y_rand = torch.floor(u[:, U_Y] * (heights - h + 1).clamp(min=1)).long().minimum((heights - h).clamp(min=0))
    x_rand = torch.floor(u[:, U_X] * (widths - w + 1).clamp(min=1)).long().minimum((widths - w).clamp(min=0))

    y0 = torch.where(any_ok, y_rand, (heights - fb_h) // 2)
    x0 = torch.where(any_ok, x_rand, (widths - fb_w) // 2)
    h = torch.where(any_ok, h, fb_h)
    w = torch.where(any_ok, w, fb_w)
    return y0, x0, h, w


def _check_color(flip_p, jitter_p, grayscale_p, blur_p, hue, blur_sigma):
    for name, p in (("flip_p", flip_p), ("jitter_p", jitter_p), ("grayscale_p", grayscale_p), ("blur_p", blur_p)):
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    if not 0.0 <= float(hue) <= 0.5:
        raise ValueError(f"hue must be in [0, 0.5], got {hue!r}")
    return _check_range("blur_sigma", blur_sigma, 1e-12)


def rows_from_uniforms(
    u: torch.Tensor,
    heights: torch.Tensor,
    widths: torch.Tensor,
    scale: Sequence[float] = (0.36, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    color: bool = True,
    flip_p: float = 0.5,
    jitter_p: float = 0.8,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    grayscale_p: float = 0.2,
    blur_p: float = 0.5,
    blur_sigma: Sequence[float] = (0.1, 2.0),
) -> torch.Tensor:
    """Crop rows from uniforms: Tensor[K, NUM_UNIFORMS] float64 in [0, 1) -> Tensor[K, 12] float32.

    heights, widths: LongTensor[K], the source size of each row's image. Column 0 (image_index)
    is left 0 for the caller. The distributions are those of `sample_crop_params`.
    """
    scale = _check_range("scale", scale, 0.0)
    ratio = _check_range("ratio", ratio, 1e-12)
    blur_sigma = _check_color(flip_p, jitter_p, grayscale_p, blur_p, hue, blur_sigma)
    if u.dim() != 2 or u.shape[1] != NUM_UNIFORMS:
        raise ValueError(f"u must be a Tensor[K, {NUM_UNIFORMS}] of uniforms, got {tuple(u.shape)}")
    K = u.shape[0]
    u = u.double()
    rows = torch.zeros(K, NUM_COLS, dtype=torch.float64)
    rows[:, BRIGHTNESS] = rows[:, CONTRAST] = rows[:, SATURATION] = 1.0
    if K == 0:
        return rows.float()
    y0, x0, h, w = windows_from_uniforms(u, heights, widths, scale, ratio)
    rows[:, Y0], rows[:, X0], rows[:, H], rows[:, W] = y0.double(), x0.double(), h.double(), w.double()
    rows[:, FLIP] = (u[:, U_FLIP] < flip_p).double()
    if color:
        jitter = u[:, U_JITTER] < jitter_p
        one = torch.ones(K, dtype=torch.float64)
        for col, uc, x in ((BRIGHTNESS, U_BRIGHTNESS, brightness), (CONTRAST, U_CONTRAST, contrast),
                           (SATURATION, U_SATURATION, saturation)):
            rows[:, col] = torch.where(jitter, _between(u[:, uc], max(0.0, 1 - x), 1 + x), one)
        rows[:, HUE] = torch.where(jitter, _between(u[:, U_HUE], -hue, hue), one * 0)
        rows[:, GRAYSCALE] = (u[:, U_GRAY] < grayscale_p).double()
        rows[:, BLUR_SIGMA] = torch.where(u[:, U_BLUR] < blur_p, _between(u[:, U_SIGMA], *blur_sigma), one * 0)
    return rows.float()


def _sizes(sizes):
    sizes = [tuple(int(v) for v in s) for s in sizes]
    for s in sizes:
        if len(s) != 2 or s[0] < 1 or s[1] < 1:
            raise ValueError(f"sizes must hold (H, W) pairs of positive ints, got {s!r}")
    return sizes


def sample_crop_params(
    sizes: Sequence[Sequence[int]],
    n_views: int,
    size: Optional[int] = None,
    scale: Sequence[float] = (0.36, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: Optional[torch.Generator] = None,
    color: bool = True,
    **color_kwargs,
) -> torch.Tensor:
    """Draw `n_views` crop rows per source image (STELLAR.md section 5 probabilities).

    sizes: [(H, W), ...] of the source images. Rows are image-major: row i * n_views + v is
    view v of image i. `size` (the output side) does not influence the rows (they are in
    source pixels); it is accepted for the documented signature and checked when given.
    Every view draws its own values: window (RandomResizedCrop, 10 tries then the central
    fallback), flip with `flip_p`; when `color`, colour jitter with `jitter_p` (factors
    uniform in [max(0, 1-x), 1+x], hue shift uniform in [-hue, hue]; 1/1/1/0 when not
    applied), grayscale with `grayscale_p`, blur with `blur_p` and sigma ~ U(blur_sigma)
    (`color_kwargs`: flip_p, jitter_p, brightness, contrast, saturation, hue, grayscale_p,
    blur_p, blur_sigma; defaults as `rows_from_uniforms`).
    `color=False` gives rows with identity colour values (the un-augmented `image` view).
    Deterministic for a seeded `generator`.
    Returns Tensor[K, 12] float32, K = len(sizes) * n_views (see the module docstring).
    """
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive int (the output side) or None, got {size!r}")
    if isinstance(n_views, bool) or not isinstance(n_views, int) or n_views < 0:
        raise ValueError(f"n_views must be a non-negative int, got {n_views!r}")
    sizes = _sizes(sizes)
    K = len(sizes) * n_views
    u = torch.rand(K, NUM_UNIFORMS, generator=generator, dtype=torch.float64)
    heights = torch.tensor([s[0] for s in sizes], dtype=torch.long).repeat_interleave(n_views)
    widths = torch.tensor([s[1] for s in sizes], dtype=torch.long).repeat_interleave(n_views)
    rows = rows_from_uniforms(u, heights, widths, scale, ratio, color, **color_kwargs)
    rows[:, IMAGE_INDEX] = torch.arange(len(sizes), dtype=torch.float32).repeat_interleave(n_views)
    return rows


def multicrop_rows(
    u: torch.Tensor,
    sizes: Sequence[Sequence[int]],
    num_global: int = 8,
    num_local: int = 8,
    global_scale: Sequence[float] = (0.36, 1.0),
    local_scale: Sequence[float] = (0.06, 0.36),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    **color_kwargs,
) -> dict:
    """The rows of STELLAR's views of B images from their uniforms.

    u: Tensor[B, 1 + num_global + num_local, NUM_UNIFORMS] (per image: `image`, then the global
    views, then the local views); sizes: B (H, W) pairs. Returns {"image": Tensor[B, 12],
    "global": Tensor[B * num_global, 12], "local": Tensor[B * num_local, 12]} (image-major, column
    0 = the image's index in the batch): `image` has no colour augmentation; the first global
    view of each image reuses the `image` window and flip, plus its own colour draw; the other
    global and all local views draw everything themselves.
    """
    sizes = _sizes(sizes)
    B, G, Lc = len(sizes), num_global, num_local
    if tuple(u.shape) != (B, 1 + G + Lc, NUM_UNIFORMS):
        raise ValueError(f"u must be a Tensor[B={B}, {1 + G + Lc}, {NUM_UNIFORMS}], got {tuple(u.shape)}")
    hw = torch.tensor(sizes, dtype=torch.long).view(B, 2)

    def group(lo, n, scale, color):
        rows = rows_from_uniforms(u[:, lo : lo + n].reshape(B * n, NUM_UNIFORMS), hw[:, 0].repeat_interleave(n),
                                  hw[:, 1].repeat_interleave(n), scale, ratio, color, **color_kwargs)
        rows[:, IMAGE_INDEX] = torch.arange(B, dtype=torch.float32).repeat_interleave(n)
        return rows

    image = group(0, 1, global_scale, False)
    glob = group(1, G, global_scale, True)
    local = group(1 + G, Lc, local_scale, True)
    if G > 0:
        first = torch.arange(B) * G
        glob[first, Y0 : FLIP + 1] = image[:, Y0 : FLIP + 1]
    return {"image": image, "global": glob, "local": local}


def sample_multicrop_params(
    sizes: Sequence[Sequence[int]],
    generator: Optional[torch.Generator] = None,
    num_global: int = 8,
    num_local: int = 8,
    global_scale: Sequence[float] = (0.36, 1.0),
    local_scale: Sequence[float] = (0.06, 0.36),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    **color_kwargs,
) -> dict:
    """`multicrop_rows` for B images with uniforms drawn from `generator` (one draw for the batch;
    the loaders draw per sample instead, `stellar.data.draws`). Returns its dict."""
    sizes = _sizes(sizes)
    u = torch.rand(len(sizes), 1 + num_global + num_local, NUM_UNIFORMS, generator=generator, dtype=torch.float64)
    return multicrop_rows(u, sizes, num_global, num_local, global_scale, local_scale, ratio, **color_kwargs)


# ----------------------------------------------------------------------------------------------
# Application
# ----------------------------------------------------------------------------------------------


def _source_index(start, length, limit, size, dtype):
    """Bilinear taps along one axis for K windows (align_corners=False, no antialias).

    start, length: LongTensor[k] window start / extent; limit: the image extent.
    Returns (i0, i1, lam): LongTensor[k, size] image indices of the two taps (border
    replicated) and Tensor[k, size] the weight of i1, as PyTorch's upsample_bilinear2d.
    """
    scale = length.to(dtype) / size  # [k]
    dst = torch.arange(size, dtype=dtype)
    src = ((dst[None, :] + 0.5) * scale[:, None] - 0.5).clamp_min(0.0)  # [k, size]
    i0 = torch.floor(src).long()
    lam = src - i0.to(dtype)
    i1 = torch.minimum(i0 + 1, (length - 1)[:, None])
    i0 = torch.minimum(i0, (length - 1)[:, None])
    i0 = (start[:, None] + i0).clamp(0, limit - 1)
    i1 = (start[:, None] + i1).clamp(0, limit - 1)
    return i0, i1, lam


def _resized_crops(image, rows, size, dtype):
    """Crop + bilinear resize + flip of one source image for its k rows.

    image: Tensor[3, H, W] float (dtype); rows: Tensor[k, 12]. Returns Tensor[k, 3, size, size].
    """
    _, Hs, Ws = image.shape
    y0, x0 = rows[:, Y0].long(), rows[:, X0].long()
    h, w = rows[:, H].long(), rows[:, W].long()
    y_0, y_1, ly = _source_index(y0, h, Hs, size, dtype)
    x_0, x_1, lx = _source_index(x0, w, Ws, size, dtype)
    # A horizontal flip of the output reads output column size-1-x: reverse the x taps.
    flip = rows[:, FLIP] > 0.5
    x_0 = torch.where(flip[:, None], x_0.flip(-1), x_0)
    x_1 = torch.where(flip[:, None], x_1.flip(-1), x_1)
    lx = torch.where(flip[:, None], lx.flip(-1), lx)

    flat = image.reshape(3, Hs * Ws)

    def tap(ys, xs):  # -> [k, 3, size, size]: image[:, ys[k, i], xs[k, j]]
        idx = (ys[:, :, None] * Ws + xs[:, None, :]).reshape(-1)
        return flat.index_select(1, idx).view(3, -1, size, size).transpose(0, 1)

    ly = ly[:, None, :, None]
    lx = lx[:, None, None, :]
    top = (1 - lx) * tap(y_0, x_0) + lx * tap(y_0, x_1)
    bottom = (1 - lx) * tap(y_1, x_0) + lx * tap(y_1, x_1)
    return (1 - ly) * top + ly * bottom


def _gray(x):
    """x: Tensor[k, 3, h, w] -> Tensor[k, 1, h, w] luma (torchvision rgb_to_grayscale)."""
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x, y, ratio):
    """torchvision's _blend for float images: (ratio * x + (1 - ratio) * y).clamp(0, 1)."""
    return (ratio * x + (1 - ratio) * y).clamp(0.0, 1.0)


def _rgb_to_hsv(x):
    """Tensor[k, 3, h, w] RGB in [0,1] -> HSV with h in [0, 1) (torchvision's formulas)."""
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    eqc = maxc == minc
    crange = maxc - minc
    ones = torch.ones_like(maxc)
    s = crange / torch.where(eqc, ones, maxc)
    div = torch.where(eqc, ones, crange)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~is_r & ~is_g
    h = (bc - gc) * is_r + (2.0 + rc - bc) * is_g + (4.0 + gc - rc) * is_b
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h, s, v):
    """HSV (each Tensor[k, h, w], h in [0,1)) -> Tensor[k, 3, h, w] (torchvision's formulas)."""
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.long().remainder(6)
    p = ((1.0 - s) * v).clamp(0.0, 1.0)
    q = ((1.0 - s * f) * v).clamp(0.0, 1.0)
    t = ((1.0 - s + s * f) * v).clamp(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=1)  # [k, 4, h, w]
    select = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=h.device)
    index = select[:, i].permute(1, 0, 2, 3)  # [k, 3, h, w]: which of v,p,q,t feeds r, g, b
    return vpqt.gather(1, index)


def _adjust_hue(x, shift):
    """x: Tensor[k, 3, h, w]; shift: Tensor[k] in [-0.5, 0.5]."""
    h, s, v = _rgb_to_hsv(x)
    h = torch.remainder(h + shift[:, None, None], 1.0)
    return _hsv_to_rgb(h, s, v)


def _gaussian_blur(x, sigma):
    """Separable Gaussian blur, kernel 9, reflect padding. x: Tensor[k, 3, h, w]; sigma: Tensor[k] > 0."""
    half = BLUR_KERNEL // 2
    d = torch.arange(-half, half + 1, dtype=x.dtype)
    kernel = torch.softmax(-(d[None, :] ** 2) / (2.0 * sigma[:, None] ** 2), dim=1)  # [k, 9]
    k, c, h, w = x.shape
    padded = F.pad(x, (half, half, half, half), mode="reflect").reshape(1, k * c, h + 2 * half, w + 2 * half)
    # one depthwise channel per (crop, colour): along rows, then along columns
    weight = kernel.repeat_interleave(c, dim=0)  # [k * c, 9]
    horiz = F.conv2d(padded, weight[:, None, None, :], groups=k * c)
    return F.conv2d(horiz, weight[:, None, :, None], groups=k * c).reshape(k, c, h, w)


def _to_float(image, dtype, name):
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name} must be a Tensor[3, H, W] (uint8 or float in [0, 1]), got {shape}")
    if image.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU (this is the CPU reference; torch.ops.stellar.multicrop runs on CUDA)")
    if image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"{name} is empty: shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.to(dtype) / 255.0
    if not image.is_floating_point():
        raise ValueError(f"{name} must be uint8 or floating point, got {image.dtype}")
    return image.to(dtype)


def apply_crops(
    images: Union[Sequence[torch.Tensor], torch.Tensor],
    params: torch.Tensor,
    size: int,
    normalize: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Cut, resize and colour-augment one crop per row of `params`.

    images: a list of uint8 Tensor[3, H_i, W_i] (or float in [0, 1]), or a Tensor[N, 3, H, W],
        on the CPU.
    params: Tensor[K, 12] crop rows (module docstring); image_index selects the source.
    size: output side. normalize: subtract ImageNet mean, divide by std at the end.
    dtype: working and output dtype (float32, or float64 for tests).
    Returns Tensor[K, 3, size, size] of `dtype`.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if not isinstance(params, torch.Tensor) or params.dim() != 2 or params.shape[1] != NUM_COLS:
        shape = tuple(params.shape) if isinstance(params, torch.Tensor) else type(params).__name__
        raise ValueError(f"params must be a float Tensor[K, {NUM_COLS}] of crop rows, got {shape}")
    if not params.is_floating_point():
        raise ValueError(f"params must be floating point, got {params.dtype}")
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be a list of Tensor[3, H, W] or a Tensor[N, 3, H, W], got {tuple(images.shape)}")
        images = list(images.unbind(0))
    images = list(images)
    params = params.detach().cpu().to(torch.float64)
    K = params.shape[0]
    out = torch.empty(K, 3, size, size, dtype=dtype)
    if K == 0:
        return out
    index = params[:, IMAGE_INDEX].long()
    if index.min() < 0 or index.max() >= len(images):
        raise ValueError(f"params image_index must lie in [0, {len(images)}), got {index.min()}..{index.max()}")
    if (params[:, H] < 1).any() or (params[:, W] < 1).any():
        raise ValueError("params h and w (columns 3, 4) must be >= 1")
    if (params[:, HUE].abs() > 0.5).any():
        raise ValueError("params hue (column 9) must lie in [-0.5, 0.5]")
    if (params[:, BLUR_SIGMA] < 0).any() or (params[:, BRIGHTNESS:SATURATION + 1] < 0).any():
        raise ValueError("params brightness/contrast/saturation and blur_sigma must be >= 0")

    # 1. crop + resize (+ flip, as reversed x taps), one source image at a time
    for i in index.unique().tolist():
        sel = (index == i).nonzero()[:, 0]
        image = _to_float(images[i], dtype, f"images[{i}]")
        out[sel] = _resized_crops(image, params[sel], size, dtype)

    p = params.to(dtype)
    view = lambda col: p[:, col][:, None, None, None]  # noqa: E731  per-row scalar, broadcastable
    # 2. brightness, contrast (blend with the mean luma of the crop), saturation
    x = (out * view(BRIGHTNESS)).clamp(0.0, 1.0)
    x = _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), view(CONTRAST))
    x = _blend(x, _gray(x), view(SATURATION))
    # 3. hue, only on rows that shift it (the HSV round trip is not an exact identity)
    rows = (p[:, HUE] != 0).nonzero()[:, 0]
    if rows.numel():
        x[rows] = _adjust_hue(x[rows], p[rows, HUE])
    # 4. grayscale, 3 channels
    rows = (p[:, GRAYSCALE] > 0.5).nonzero()[:, 0]
    if rows.numel():
        x[rows] = _gray(x[rows]).expand(-1, 3, -1, -1)
    # 5. Gaussian blur
    rows = (p[:, BLUR_SIGMA] > 0).nonzero()[:, 0]
    if rows.numel():
        if size <= BLUR_KERNEL // 2:
            raise ValueError(f"size must be > {BLUR_KERNEL // 2} for the reflect-padded blur, got {size}")
        x[rows] = _gaussian_blur(x[rows], p[rows, BLUR_SIGMA])
    # 6. normalize
    if normalize:
        mean = torch.tensor(IMAGENET_MEAN, dtype=dtype)[None, :, None, None]
        std = torch.tensor(IMAGENET_STD, dtype=dtype)[None, :, None, None]
        x = (x - mean) / std
    return x

"""The augmentation reference against torchvision's v2 functional chain, and its sampling."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from stellar.data import augment
from stellar.data.augment import COLS, apply_crops, sample_crop_params, sample_multicrop_params

MEAN = list(augment.IMAGENET_MEAN)
STD = list(augment.IMAGENET_STD)


def torchvision_chain(image, row, size, normalize):
    """One crop row through the torchvision v2 functional ops, in the documented order."""
    _, y0, x0, h, w, flip, b, c, s, hue, gray, sigma = row.tolist()
    x = TF.resized_crop(image, int(y0), int(x0), int(h), int(w), [size, size], antialias=False)
    if flip:
        x = TF.hflip(x)
    x = TF.adjust_brightness(x, b)
    x = TF.adjust_contrast(x, c)
    x = TF.adjust_saturation(x, s)
    if hue != 0:
        x = TF.adjust_hue(x, hue)
    if gray:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if sigma > 0:
        x = TF.gaussian_blur(x, [9, 9], [sigma, sigma])
    if normalize:
        x = TF.normalize(x, MEAN, STD)
    return x


def make_row(image_index=0, y0=0, x0=0, h=8, w=8, flip=0, b=1.0, c=1.0, s=1.0, hue=0.0, gray=0, sigma=0.0):
    return torch.tensor([image_index, y0, x0, h, w, flip, b, c, s, hue, gray, sigma], dtype=torch.float32)


def random_images(gen, shapes, dtype=torch.float64):
    return [torch.rand(3, h, w, generator=gen, dtype=dtype) for h, w in shapes]


def test_cols_layout():
    assert len(COLS) == 12
    assert COLS.index("image_index") == augment.IMAGE_INDEX == 0
    assert COLS.index("blur_sigma") == augment.BLUR_SIGMA == 11
    assert COLS.index("hue") == augment.HUE == 9


STEPS = {
    "geometry": {},
    "flip": {"flip": 1},
    "brightness": {"b": 1.37},
    "brightness_clamp": {"b": 1.9},
    "contrast": {"c": 0.63},
    "contrast_up": {"c": 1.4},
    "saturation": {"s": 1.18},
    "saturation_down": {"s": 0.45},
    "hue": {"hue": 0.083},
    "hue_neg": {"hue": -0.31},
    "grayscale": {"gray": 1},
    "blur_small": {"sigma": 0.13},
    "blur": {"sigma": 1.7},
    "all": {"flip": 1, "b": 0.7, "c": 1.3, "s": 0.85, "hue": -0.07, "gray": 1, "sigma": 0.9},
    "all_no_gray": {"flip": 1, "b": 1.2, "c": 0.8, "s": 1.15, "hue": 0.09, "sigma": 1.3},
}


@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("normalize", [False, True])
def test_each_step_matches_torchvision_float64(step, normalize):
    gen = torch.Generator().manual_seed(sorted(STEPS).index(step))
    images = random_images(gen, [(23, 31), (17, 13)])
    # image index, y0, x0, h, w, output size: downscale, upscale, whole image, thin window
    windows = [(0, 1, 3, 19, 27, 13), (1, 1, 2, 15, 9, 11), (0, 0, 0, 23, 31, 20), (1, 5, 7, 11, 5, 16)]
    for idx, y0, x0, h, w, size in windows:
        row = make_row(idx, y0, x0, h, w, **STEPS[step])
        ours = apply_crops(images, row[None], size, normalize=normalize, dtype=torch.float64)[0]
        ref = torchvision_chain(images[idx], row.double(), size, normalize)
        # torchvision's adjust_hue runs in float32 whatever the input dtype
        tol = 1e-5 if "hue" in step or step.startswith("all") else 1e-12
        torch.testing.assert_close(ours, ref, rtol=0, atol=tol)


def test_hue_matches_torchvision_float32_exactly_enough():
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(3, 12, 10, generator=gen)
    for shift in (-0.5, -0.2, 0.04, 0.33, 0.5):
        row = make_row(0, 0, 0, 12, 10, hue=shift)
        ours = apply_crops([image], row[None], 12, normalize=False)[0]
        # crop of the whole image at its own size is an identity resize
        ref = TF.adjust_hue(TF.resize(image[:, :, :], [12, 12], antialias=False), shift)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_uint8_input_equals_float_input():
    gen = torch.Generator().manual_seed(5)
    u8 = torch.randint(0, 256, (3, 20, 24), generator=gen, dtype=torch.uint8)
    rows = sample_crop_params([(20, 24)], 6, None, (0.2, 1.0), (0.75, 1.33), gen)
    a = apply_crops([u8], rows, 16, dtype=torch.float64)
    b = apply_crops([u8.double() / 255], rows, 16, dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_batch_of_rows_equals_rows_one_by_one_and_float32_close_to_float64():
    gen = torch.Generator().manual_seed(11)
    images = random_images(gen, [(30, 22), (19, 41), (25, 25)], dtype=torch.float32)
    rows = sample_crop_params([tuple(im.shape[1:]) for im in images], 5, None, (0.1, 1.0), (0.75, 1.33), gen)
    together = apply_crops(images, rows, 14, dtype=torch.float64)
    for k in range(rows.shape[0]):
        alone = apply_crops(images, rows[k : k + 1], 14, dtype=torch.float64)[0]
        torch.testing.assert_close(together[k], alone, rtol=0, atol=1e-12)
    single = apply_crops(images, rows, 14, dtype=torch.float32)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single, together.float(), rtol=0, atol=2e-5)


def test_window_outside_image_replicates_border():
    gen = torch.Generator().manual_seed(2)
    image = torch.rand(3, 5, 7, generator=gen, dtype=torch.float64)
    # a window hanging past every side of the image, larger than the image
    y0, x0, h, w, size = -3, -2, 11, 12, 16
    row = make_row(0, y0, x0, h, w)
    ours = apply_crops([image], row[None], size, normalize=False, dtype=torch.float64)[0]
    pad = (-x0, x0 + w - 7, -y0, y0 + h - 5)  # left, right, top, bottom
    padded = F.pad(image[None], pad, mode="replicate")[0]
    ref = F.interpolate(padded[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_tiny_image_larger_crop_output():
    image = torch.randint(0, 256, (3, 2, 3), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    rows = sample_crop_params([(2, 3)], 4, 24, (0.06, 0.36), (0.75, 1.33), gen)
    out = apply_crops([image], rows, 24, normalize=False)
    assert out.shape == (4, 3, 24, 24)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_bad_inputs_raise_naming_the_argument():
    image = torch.rand(3, 8, 8)
    row = make_row(0, 0, 0, 4, 4)
    with pytest.raises(ValueError, match="params"):
        apply_crops([image], row, 8)
    with pytest.raises(ValueError, match="image_index"):
        apply_crops([image], make_row(1, 0, 0, 4, 4)[None], 8)
    with pytest.raises(ValueError, match="images"):
        apply_crops([torch.rand(4, 8, 8)], row[None], 8)
    with pytest.raises(ValueError, match="size"):
        apply_crops([image], row[None], 0)
    with pytest.raises(ValueError, match="scale"):
        sample_crop_params([(8, 8)], 2, None, (0.5,), (0.75, 1.33))
    with pytest.raises(ValueError, match="size"):
        sample_crop_params([(8, 8)], 2, (0.36, 1.0))
    with pytest.raises(ValueError, match="sizes"):
        sample_crop_params([(0, 8)], 2)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def test_sampling_deterministic_and_each_view_its_own():
    sizes = [(64, 80), (50, 40)]
    a = sample_crop_params(sizes, 8, 32, generator=torch.Generator().manual_seed(7))
    b = sample_crop_params(sizes, 8, 32, generator=torch.Generator().manual_seed(7))
    c = sample_crop_params(sizes, 8, 32, generator=torch.Generator().manual_seed(8))
    assert a.dtype == torch.float32 and a.shape == (16, 12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a[:, 0].tolist() == [0.0] * 8 + [1.0] * 8
    jittered = a[a[:, augment.BRIGHTNESS] != 1]
    assert len(set(jittered[:, augment.BRIGHTNESS].tolist())) == len(jittered) > 1
    assert len(set(map(tuple, a[:, 1:5].tolist()))) > 8


def test_sampling_statistics():
    n = 4000
    gen = torch.Generator().manual_seed(0)
    H, W = 90, 120
    rows = sample_crop_params([(H, W)], n, 32, (0.36, 1.0), (3 / 4, 4 / 3), gen).double()
    y0, x0, h, w = rows[:, 1], rows[:, 2], rows[:, 3], rows[:, 4]
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= H).all() and (x0 + w <= W).all()
    assert (h == h.round()).all() and (w == w.round()).all()
    frac = h * w / (H * W)
    assert frac.min() > 0.3 and frac.max() <= 1.0 + 1e-9
    aspect = w / h
    inside = aspect[(h < H - 1) & (w < W - 1)]
    assert inside.min() > 0.7 and inside.max() < 1.4

    def rate(mask, p):
        se = math.sqrt(p * (1 - p) / n)
        assert abs(mask.double().mean().item() - p) < 5 * se

    rate(rows[:, augment.FLIP] == 1, 0.5)
    jitter = rows[:, augment.BRIGHTNESS] != 1
    rate(jitter, 0.8)
    rate(rows[:, augment.GRAYSCALE] == 1, 0.2)
    blur = rows[:, augment.BLUR_SIGMA] > 0
    rate(blur, 0.5)
    # jitter applies all four or none
    assert torch.equal(jitter, rows[:, augment.CONTRAST] != 1)
    assert torch.equal(jitter, rows[:, augment.SATURATION] != 1)
    assert torch.equal(jitter, rows[:, augment.HUE] != 0)
    for col, lo, hi in ((augment.BRIGHTNESS, 0.6, 1.4), (augment.CONTRAST, 0.6, 1.4),
                        (augment.SATURATION, 0.8, 1.2), (augment.HUE, -0.1, 0.1)):
        v = rows[jitter, col]
        assert v.min() >= lo - 1e-6 and v.max() <= hi + 1e-6
        assert v.min() < lo + 0.05 * (hi - lo) and v.max() > hi - 0.05 * (hi - lo)
        assert abs(v.mean().item() - (lo + hi) / 2) < 0.03 * (hi - lo)
    s = rows[blur, augment.BLUR_SIGMA]
    assert s.min() >= 0.1 - 1e-6 and s.max() <= 2.0 + 1e-6 and abs(s.mean().item() - 1.05) < 0.05
    # independent draws: grayscale does not follow jitter
    both = (jitter & (rows[:, augment.GRAYSCALE] == 1)).double().mean().item()
    assert abs(both - 0.16) < 0.03


def test_color_false_rows_are_uncoloured():
    rows = sample_crop_params([(40, 40)] * 3, 50, 16, generator=torch.Generator().manual_seed(1), color=False)
    assert (rows[:, augment.BRIGHTNESS : augment.SATURATION + 1] == 1).all()
    assert (rows[:, augment.HUE] == 0).all() and (rows[:, augment.GRAYSCALE] == 0).all()
    assert (rows[:, augment.BLUR_SIGMA] == 0).all()
    assert 0 < rows[:, augment.FLIP].mean() < 1


def test_fallback_is_central_crop_when_no_try_fits():
    # scale above 1 never fits: torchvision falls back to the central crop clipped to the ratio
    rows = sample_crop_params([(10, 40), (40, 10), (30, 30)], 3, None, (2.0, 3.0), (0.75, 4 / 3),
                              torch.Generator().manual_seed(0))
    expect = {0: (0, 13, 10, 13), 1: (13, 0, 13, 10), 2: (0, 0, 30, 30)}  # y0, x0, h, w
    for r in rows.tolist():
        assert tuple(int(v) for v in r[1:5]) == expect[int(r[0])]


def test_multicrop_first_global_shares_image_window():
    sizes = [(64, 64), (48, 72)]
    rows = sample_multicrop_params(sizes, torch.Generator().manual_seed(4), num_global=3, num_local=2)
    assert rows["image"].shape == (2, 12) and rows["global"].shape == (6, 12) and rows["local"].shape == (4, 12)
    for i in range(2):
        assert torch.equal(rows["global"][3 * i, 0:6], rows["image"][i, 0:6])
        assert not torch.equal(rows["global"][3 * i + 1, 1:5], rows["image"][i, 1:5])
    assert (rows["image"][:, augment.BRIGHTNESS] == 1).all()
    local_frac = rows["local"][:, 3] * rows["local"][:, 4] / torch.tensor([64 * 64] * 2 + [48 * 72] * 2)
    assert local_frac.max() < 0.45


def test_hue_float64_against_torchvision_hsv_formulas():
    """adjust_hue casts to float32; its HSV helpers themselves are dtype-generic."""
    color = pytest.importorskip("torchvision.transforms.v2.functional._color")
    if not hasattr(color, "_rgb_to_hsv") or not hasattr(color, "_hsv_to_rgb"):
        pytest.skip("torchvision's private HSV helpers moved")
    gen = torch.Generator().manual_seed(9)
    image = torch.rand(3, 9, 11, generator=gen, dtype=torch.float64)
    image[:, 0, 0] = 0.25  # a gray pixel (max == min)
    for shift in (-0.5, -0.13, 0.21, 0.5):
        ours = apply_crops([image], make_row(0, 0, 0, 9, 11, hue=shift)[None], 9, normalize=False, dtype=torch.float64)
        hsv = color._rgb_to_hsv(TF.resize(image, [9, 9], antialias=False))
        h, s, v = hsv.unbind(0)
        ref = color._hsv_to_rgb(torch.stack(((h + torch.tensor(shift, dtype=torch.float32).double()) % 1.0, s, v)))
        torch.testing.assert_close(ours[0], ref, rtol=0, atol=1e-12)

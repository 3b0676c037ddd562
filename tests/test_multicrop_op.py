"""torch.ops.stellar.multicrop (C++ CPU body) against its PyTorch twin, apply_crops, in float64.

The reference runs in float64 on the same rows; the op computes in float32, so fp32 outputs
agree to ~1e-5 (normalized values, ~5e-6 in [0, 1]).
"""
import os
import shutil
import subprocess

import pytest
import torch

from stellar import _ext
from stellar.data.augment import COLS, apply_crops, sample_crop_params

if os.environ.get("STELLAR_SKIP_EXT") == "1":
    pytest.skip("STELLAR_SKIP_EXT=1: stellar._C not built", allow_module_level=True)

from stellar.data.multicrop import MultiCrop  # noqa: E402
from stellar.ops import multicrop  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 4e-2, torch.float16: 4e-3}
C = {name: i for i, name in enumerate(COLS)}


@pytest.fixture(autouse=True)
def _one_thread_loaded_and_poisoned():
    """One thread; the extension loaded; and every buffer torch allocates uninitialized (at::empty
    inside the op included) filled with NaN first, so an element the op forgets to write fails
    the comparison (torch's deterministic mode fills uninitialized memory)."""
    _ext.load()  # a missing or stale extension fails here, loudly, not as a skip
    threads = torch.get_num_threads()
    deterministic, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = fill
    torch.set_num_threads(threads)


@pytest.mark.parametrize("device", DEVICES)
def test_the_ops_buffers_are_poisoned(device):
    """What makes the comparisons able to fail on an unwritten element: at::empty, the op's own
    allocator call, hands out NaN here."""
    assert torch.ops.aten.empty.memory_format([4, 3], device=device).isnan().all()


def _images(sizes, gen):
    """Random uint8 Tensor[3, H, W] images (never constant)."""
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in sizes]


def _op(images, rows, size, device="cpu", rows_on_device=False, **kw):
    hwc = [im.to(device).permute(1, 2, 0) for im in images]
    out = multicrop(hwc, rows.to(device) if rows_on_device else rows, size, **kw)
    assert out.device.type == device
    return out.cpu()


def _row(image=0, y0=0, x0=0, h=4, w=4, flip=0, b=1.0, c=1.0, s=1.0, hue=0.0, gray=0, sigma=0.0):
    return [image, y0, x0, h, w, flip, b, c, s, hue, gray, sigma]


def _compare(images, rows, size, normalize=True, dtype=torch.float32, device="cpu", rows_on_device=False):
    rows = torch.tensor(rows, dtype=torch.float32) if not isinstance(rows, torch.Tensor) else rows
    ref = apply_crops(images, rows, size, normalize=normalize, dtype=torch.float64)
    out = _op(images, rows, size, device, rows_on_device, normalize=normalize, dtype=dtype)
    assert out.dtype == dtype and out.shape == (rows.shape[0], 3, size, size)
    err = (out.double() - ref).abs().max().item()
    assert err <= ATOL[dtype], f"max abs error {err:.3g} > {ATOL[dtype]}"
    return out


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(
    "sizes,views,size",
    [
        ([(37, 50), (64, 23)], 5, 17),  # non-square images, non-square windows
        ([(8, 8)], 6, 8),  # 8x8 images
        ([(8, 8), (13, 9), (40, 31)], 3, 24),  # upsampling small images
        ([(96, 80)], 4, 7),  # downsampling
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_random_rows_match_reference(sizes, views, size, normalize, device, gen):
    images = _images(sizes, gen)
    rows = sample_crop_params(sizes, views, generator=gen, jitter_p=0.9, grayscale_p=0.3, blur_p=0.6)
    _compare(images, rows, size, normalize=normalize, device=device)
    if device == "cuda":
        _compare(images, rows, size, normalize=normalize, device=device, rows_on_device=True)


@pytest.mark.parametrize(
    "window",
    [
        dict(y0=0, x0=0, h=1, w=1),  # 1-pixel crop
        dict(y0=12, x0=9, h=1, w=1),  # 1-pixel crop at the far corner
        dict(y0=-3, x0=-5, h=8, w=6),  # past the top-left border
        dict(y0=10, x0=5, h=9, w=11),  # past the bottom-right border
        dict(y0=-6, x0=-4, h=30, w=25),  # larger than the image on every side
        dict(y0=0, x0=0, h=13, w=10),  # the whole image
        dict(y0=2, x0=0, h=3, w=10),  # a wide strip
    ],
)
@pytest.mark.parametrize("flip", [0, 1])
@pytest.mark.parametrize("device", DEVICES)
def test_windows_at_borders_and_beyond(window, flip, device, gen):
    images = _images([(13, 10)], gen)  # H=13, W=10
    rows = [_row(**window, flip=flip), _row(**window, flip=flip, b=1.3, c=0.6, s=1.2, hue=0.1, sigma=1.1)]
    _compare(images, rows, 12, device=device)


STEPS = {
    "none": {},
    "brightness_low": dict(b=0.55),
    "brightness_high": dict(b=1.9),  # clamps
    "brightness_zero": dict(b=0.0),
    "contrast_low": dict(c=0.3),
    "contrast_high": dict(c=1.8),
    "contrast_zero": dict(c=0.0),
    "saturation_low": dict(s=0.2),
    "saturation_high": dict(s=2.5),
    "hue_pos": dict(hue=0.27),
    "hue_neg": dict(hue=-0.41),
    "hue_half": dict(hue=0.5),
    "grayscale": dict(gray=1),
    "blur_small_sigma": dict(sigma=0.05),
    "blur_sigma_0_6": dict(sigma=0.6),
    "blur_large_sigma": dict(sigma=7.5),
    "everything": dict(flip=1, b=1.2, c=0.7, s=1.4, hue=-0.08, gray=1, sigma=1.3),
    "everything_no_gray": dict(flip=1, b=0.8, c=1.3, s=0.6, hue=0.33, sigma=2.0),
}


@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("device", DEVICES)
def test_each_colour_step(step, device, gen):
    images = _images([(21, 30), (9, 14)], gen)
    rows = [_row(image=0, y0=3, x0=2, h=15, w=19, **STEPS[step]),
            _row(image=1, y0=-2, x0=4, h=11, w=13, **STEPS[step])]
    _compare(images, rows, 10, normalize=True, device=device)
    _compare(images, rows, 10, normalize=False, device=device)
    # a size spanning several blur tiles on the GPU (32 px) with a partial last tile
    _compare(images, rows, 37, normalize=True, device=device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_outputs(dtype, device, gen):
    sizes = [(30, 40), (25, 17)]
    images = _images(sizes, gen)
    rows = sample_crop_params(sizes, 4, generator=gen)
    _compare(images, rows, 16, dtype=dtype, device=device)


@CUDA
def test_cuda_matches_cpu_op_on_a_large_batch(gen):
    """Many rows and real sizes: the CUDA and CPU bodies agree (and with the reference)."""
    sizes = [(int(h), int(w)) for h, w in torch.randint(60, 200, (6, 2), generator=gen)]
    images = _images(sizes, gen)
    rows = sample_crop_params(sizes, 9, generator=gen)
    cpu, cuda = _op(images, rows, 64), _op(images, rows, 64, device="cuda")
    assert (cpu - cuda).abs().max().item() <= 1e-5
    _compare(images, rows[::7], 64, device="cuda")


def test_layouts_give_identical_views(gen):
    """A permuted CHW tensor (strided view) and a contiguous HWC copy read the same pixels."""
    sizes = [(19, 27), (31, 12)]
    images = _images(sizes, gen)
    rows = sample_crop_params(sizes, 3, generator=gen)
    strided = multicrop([im.permute(1, 2, 0) for im in images], rows, 11)
    packed = multicrop([im.permute(1, 2, 0).contiguous() for im in images], rows, 11)
    assert torch.equal(strided, packed)


def test_empty_rows_and_threads_do_not_matter(gen):
    images = _images([(12, 12)], gen)
    out = _op(images, torch.zeros(0, 12), 9)
    assert out.shape == (0, 3, 9, 9)
    rows = sample_crop_params([(12, 12)], 8, generator=gen)
    one = _op(images, rows, 9)
    torch.set_num_threads(2)
    assert torch.equal(one, _op(images, rows, 9))


def test_multicrop_fixed_seed_is_deterministic(gen):
    sizes = [(40, 52), (33, 33), (61, 20)]
    images = _images(sizes, gen)
    kw = dict(global_size=16, local_size=8, num_global=3, num_local=2, patch_size=4, seed=1234)
    a, b = MultiCrop(**kw)(images), MultiCrop(**kw)(images)
    for key in ("image", "global_views", "local_views", "crops", "keep"):
        assert torch.equal(a[key], b[key]), key
    other = MultiCrop(**{**kw, "seed": 1235})(images)
    assert not torch.equal(a["crops"], other["crops"])  # seeds draw different crops


def test_multicrop_batch_matches_reference(gen):
    sizes = [(40, 52), (33, 33)]
    images = _images(sizes, gen)
    labels = torch.tensor([3, 7])
    mc = MultiCrop(global_size=16, local_size=8, num_global=3, num_local=2, patch_size=4, seed=5)
    batch = mc(images, labels)
    B, G, Lc = 2, 3, 2
    assert batch["image"].shape == (B, 3, 16, 16)
    assert batch["global_views"].shape == (B, G, 3, 16, 16)
    assert batch["local_views"].shape == (B, Lc, 3, 8, 8)
    assert torch.equal(batch["label"], labels)
    crops = batch["crops"]
    assert crops.shape == (B * (1 + G + Lc), 12)
    image_rows, global_rows, local_rows = crops[:B], crops[B:B + B * G], crops[B + B * G:]
    # `image` is not colour-augmented; the first global view shares its window and flip.
    assert torch.equal(image_rows[:, C["brightness"]:], torch.tensor([1.0, 1, 1, 0, 0, 0]).expand(B, 6))
    assert torch.equal(global_rows[::G, :C["flip"] + 1], image_rows[:, :C["flip"] + 1])
    ref = lambda rows, s: apply_crops(images, rows, s, normalize=False, dtype=torch.float64)  # noqa: E731
    assert torch.allclose(batch["image"].double(), ref(image_rows, 16), atol=1e-5, rtol=0)
    assert torch.allclose(batch["global_views"].double(), ref(global_rows, 16).view(B, G, 3, 16, 16), atol=1e-5, rtol=0)
    assert torch.allclose(batch["local_views"].double(), ref(local_rows, 8).view(B, Lc, 3, 8, 8), atol=1e-5, rtol=0)
    assert 0.0 <= batch["global_views"].min() and batch["global_views"].max() <= 1.0  # [0, 1] views


def test_multicrop_reference_backend_agrees(gen):
    sizes = [(30, 24)]
    images = _images(sizes, gen)
    kw = dict(global_size=12, local_size=6, num_global=2, num_local=2, patch_size=3, seed=9)
    op, ref = MultiCrop(views="op", **kw)(images), MultiCrop(views="torch", **kw)(images)
    assert torch.equal(op["crops"], ref["crops"])
    for key in ("image", "global_views", "local_views"):
        assert torch.allclose(op[key], ref[key], atol=1e-5, rtol=0), key


def test_fake_implementation_for_torch_compile(gen):
    """The registered fake gives the right shape/dtype/device without running the op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    images = _images([(12, 9)], gen)
    rows = sample_crop_params([(12, 9)], 3, generator=gen)
    hwc = [im.permute(1, 2, 0) for im in images]
    multicrop(hwc, rows, 5)  # registers the fake
    mode = FakeTensorMode()
    fake_images, fake_rows = [mode.from_tensor(im) for im in hwc], mode.from_tensor(rows)
    with mode:
        out = torch.ops.stellar.multicrop(fake_images, fake_rows, 5, torch.bfloat16, False)
    assert out.shape == (3, 3, 5, 5) and out.dtype == torch.bfloat16


def test_torch_compile_traces_the_op_in_one_graph(gen):
    images = [im.permute(1, 2, 0) for im in _images([(12, 9), (7, 15)], gen)]
    rows = sample_crop_params([(12, 9), (7, 15)], 2, generator=gen)
    compiled = torch.compile(lambda im, r: multicrop(im, r, 6) * 2.0, backend="eager", fullgraph=True)
    assert torch.equal(compiled(images, rows), multicrop(images, rows, 6) * 2.0)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda im, r: (im, r[:, :11], 8), r"crops must be a float32 tensor of shape \[K, 12\]"),
        (lambda im, r: (im, r.double(), 8), r"crops must be a float32"),
        (lambda im, r: ([x.float() for x in im], r, 8), r"images\[0\] must be a uint8"),
        (lambda im, r: ([x.permute(2, 0, 1) for x in im], r, 8), r"images\[0\] must have shape \[H, W, 3\]"),
        (lambda im, r: (im, r, 0), r"size must be >= 1"),
        (lambda im, r: ([], r, 8), r"images must hold at least one image"),
        (lambda im, r: (im, _set(r, 0, 5.0), 8), r"image_index"),
        (lambda im, r: (im, _set(r, 0, 0.5), 8), r"image_index"),
        (lambda im, r: (im, _set(r, 3, 0.0), 8), r"\(h, w\) must be integers >= 1"),
        (lambda im, r: (im, _set(r, 1, 2.5), 8), r"\(y0, x0\) must be integers"),
        (lambda im, r: (im, _set(r, 5, 0.5), 8), r"\(flip\)"),
        (lambda im, r: (im, _set(r, 7, -1.0), 8), r"brightness, contrast, saturation"),
        (lambda im, r: (im, _set(r, 9, 0.7), 8), r"\(hue\)"),
        (lambda im, r: (im, _set(r, 10, 2.0), 8), r"\(grayscale\)"),
        (lambda im, r: (im, _set(r, 11, -0.1), 8), r"\(blur_sigma\)"),
        (lambda im, r: (im, _set(r, 6, float("nan")), 8), r"not finite"),
    ],
)
def test_bad_inputs_name_the_argument(make, match, gen):
    images = [im.permute(1, 2, 0) for im in _images([(10, 12)], gen)]
    rows = sample_crop_params([(10, 12)], 2, generator=gen)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.stellar.multicrop(*make(images, rows))


@CUDA
@pytest.mark.parametrize(
    "col,value,match",
    [
        (0, 5.0, r"crops\[1, 0\] \(image_index\) must be an integer in \[0, 1\), got 5"),
        (0, -1.0, r"crops\[1, 0\] \(image_index\)"),
        (0, float("nan"), r"crops\[1, 0\] is not finite"),
        (3, 0.0, r"crops\[1, 3:5\] \(h, w\) must be integers >= 1"),
        (4, -7.0, r"crops\[1, 3:5\] \(h, w\)"),
        (2, float("inf"), r"crops\[1, 2\] is not finite"),
        (11, -0.5, r"crops\[1, 11\] \(blur_sigma\)"),
    ],
)
def test_cuda_bad_rows_on_the_device_are_caught_on_the_device(col, value, match, gen):
    """Rows already on the GPU are checked there: a clear error naming the row and column, no
    read outside the image table, and the CUDA context still works afterwards."""
    images = [im.permute(1, 2, 0).cuda() for im in _images([(10, 12)], gen)]
    rows = sample_crop_params([(10, 12)], 3, generator=gen)
    bad = rows.clone()
    bad[1, col] = value
    with pytest.raises(RuntimeError, match=match):
        torch.ops.stellar.multicrop(images, bad.cuda(), 8)
    out = torch.ops.stellar.multicrop(images, rows.cuda(), 8)  # the context survived
    torch.cuda.synchronize()
    assert out.isfinite().all()


@CUDA
def test_cuda_blur_scratch_only_for_rows_that_blur(gen):
    """Device rows without blur allocate no K x 3 x S x S float scratch (the output only)."""
    sizes = [(120, 150)]
    images = [im.permute(1, 2, 0).cuda() for im in _images(sizes, gen)]
    rows = sample_crop_params(sizes, 64, generator=gen, blur_p=0.0).cuda()
    out_bytes = 64 * 3 * 96 * 96 * 4
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = torch.ops.stellar.multicrop(images, rows, 96)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 1.5 * out_bytes
    del out


def test_bad_output_dtype_names_dtype(gen):
    images = [im.permute(1, 2, 0) for im in _images([(10, 12)], gen)]
    rows = sample_crop_params([(10, 12)], 2, generator=gen)
    with pytest.raises(RuntimeError, match="dtype must be float32, bfloat16 or float16"):
        multicrop(images, rows, 8, dtype=torch.float64)


def _set(rows, col, value):
    rows = rows.clone()
    rows[0, col] = value
    return rows


def test_a_private_cxx_runtime_is_told_apart(tmp_path):
    """_ext.load refuses a stellar._C with libstdc++ linked in statically (its own __cxa_throw):
    such a build (CXX=/opt/gcc/bin/g++ on a lent H200) segfaulted on every error the op raised.
    Both kinds of library are built here and told apart; the built extension shares libstdc++."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no g++ here to build the probe libraries")
    src = tmp_path / "probe.cpp"
    src.write_text('#include <stdexcept>\nextern "C" void probe(int x) { if (x) throw std::runtime_error("x"); }\n')
    for flags, private in (([], False), (["-static-libstdc++"], True)):
        lib = tmp_path / f"probe{len(flags)}.so"
        subprocess.run([gxx, "-shared", "-fPIC", *flags, str(src), "-o", str(lib)], check=True)
        assert _ext._has_private_cxx_runtime(str(lib)) is private, flags
    assert not _ext._has_private_cxx_runtime(_ext._library_path())


def test_auto_backend_warns_when_the_extension_is_missing(monkeypatch):
    """views='auto' without a usable stellar._C uses the reference, but says so (never silently)."""
    from stellar import _ext

    monkeypatch.setattr(_ext, "is_available", lambda: False)
    g = torch.Generator().manual_seed(3)
    images = [torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8, generator=g)]
    kw = dict(global_size=8, local_size=4, num_global=1, num_local=1, patch_size=2, seed=1)
    with pytest.warns(RuntimeWarning, match="stellar._C is not usable"):
        auto = MultiCrop(views="auto", **kw)(images)
    monkeypatch.undo()
    # compared with the op (not with the reference it fell back to): a wrong fallback would show
    op = MultiCrop(views="op", **kw)(images)
    assert torch.equal(auto["crops"], op["crops"])
    for key in ("image", "global_views", "local_views"):
        torch.testing.assert_close(auto[key], op[key], rtol=0, atol=1e-5)


def test_readme_call_after_import_stellar():
    """The README's example, `import stellar` then `torch.ops.stellar.multicrop(...)`, runs as
    written in a fresh interpreter (nothing else loads stellar._C first)."""
    import pathlib
    import re
    import subprocess
    import sys

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index("## The multi-crop op"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    check = "\nassert views.shape == (crops.shape[0], 3, 224, 224) and views.dtype == torch.bfloat16\nprint('ok')\n"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr

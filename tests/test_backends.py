"""The same batches from every loader backend: every backend available here (reference, torchvision
with its CPU decoders, DALI's CPU pipeline) runs on one folder of real-ish files and is compared
with the reference: the same samples in the same order (bad files substituted alike), the same
crop rows and kept patches, views equal within the decoders' difference (measured per file)."""
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stellar import _ext
from stellar.data import dali, decode
from stellar.data.loader import build_loader

needs_op = pytest.mark.skipif(not _ext.is_available(), reason="stellar._C is not built: the fast backends run the op")
HAVE_DALI = dali.dali_status()[0]
FAST = ["torchvision", pytest.param("dali", marks=pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI does not import"))]
SPEC = dict(global_size=32, local_size=16, num_global=2, num_local=2, patch_size=8)
SAMPLE_PHOTO = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"


def _photo(rng, h, w):
    """A real photo (matplotlib's sample), a random crop resized to h x w; smooth noise without it."""
    if SAMPLE_PHOTO.is_file():
        with Image.open(SAMPLE_PHOTO) as im:
            im = im.convert("RGB")
            W, H = im.size
            y, x = int(rng.integers(0, H // 3)), int(rng.integers(0, W // 3))
            return np.asarray(im.crop((x, y, x + 2 * W // 3, y + 2 * H // 3)).resize((w, h), Image.BICUBIC))
    base = rng.normal(size=(h // 4 + 2, w // 4 + 2, 3))
    img = np.asarray(Image.fromarray(((base - base.min()) / np.ptp(base) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC))
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def make_realish_folder(root, seed=0):
    """root/train/<class>/: photo-like files of the kinds users hold, plus three bad files.

    JPEG 4:2:0 q90, 4:4:4 q75, progressive, grayscale, CMYK, EXIF orientation 6; PNG RGB, RGBA,
    palette, 16-bit grayscale; a truncated JPEG, an empty file, an HTML page named .jpg.
    Returns (good paths, bad paths), absolute.
    """
    rng = np.random.default_rng(seed)
    d0, d1 = Path(root) / "train" / "c0", Path(root) / "train" / "c1"
    d0.mkdir(parents=True, exist_ok=True)
    d1.mkdir(parents=True, exist_ok=True)
    img = lambda h, w: Image.fromarray(_photo(rng, h, w))  # noqa: E731
    img(37, 45).save(d0 / "q90.jpg", quality=90)
    img(48, 40).save(d0 / "q75_444.jpg", quality=75, subsampling=0)
    img(41, 57).save(d0 / "progressive.jpg", quality=85, progressive=True)
    img(40, 36).convert("L").save(d0 / "gray.jpg", quality=90)
    cmyk = np.asarray(img(33, 47).convert("CMYK")).copy()
    cmyk[..., 3] = _photo(rng, 33, 47)[..., 1] // 3  # a black plate too (Pillow's conversion leaves K = 0)
    Image.fromarray(cmyk, "CMYK").save(d0 / "cmyk.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to view
    img(30, 52).save(d0 / "rotated.jpg", quality=90, exif=exif.tobytes())
    img(35, 43).save(d1 / "rgb.png")
    rgba = np.concatenate([_photo(rng, 29, 38), rng.integers(0, 256, (29, 38, 1), dtype=np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(d1 / "rgba.png")
    img(44, 39).convert("P", palette=Image.ADAPTIVE, colors=32).save(d1 / "palette.png")
    g16 = (_photo(rng, 31, 42)[..., 0].astype(np.uint16) * 257 + rng.integers(0, 257, (31, 42))).astype(np.uint16)
    Image.fromarray(g16).save(d1 / "gray16.png")
    for i in range(4):
        img(34 + 3 * i, 40 + 2 * i).save(d1 / f"photo{i}.jpg", quality=88)
    good = sorted(str(p.resolve()) for d in (d0, d1) for p in d.iterdir())
    buf = io.BytesIO()
    img(40, 40).save(buf, format="JPEG")
    (d0 / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d1 / "empty.jpg").write_bytes(b"")
    (d1 / "page.jpg").write_text("<html><body>not an image</body></html>")
    bad = sorted(str(p.resolve()) for p in (d0 / "truncated.jpg", d1 / "empty.jpg", d1 / "page.jpg"))
    return good, bad


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("realish")
    good, bad = make_realish_folder(root)
    return root, good, bad


def _epoch(root, backend, **kw):
    kw = {"batch_size": 4, "num_workers": 0, "seed": 11, "device": "cpu", "drop_last": False, **SPEC, **kw}
    loader = build_loader(root, backend=backend, **kw)
    return loader, list(loader)


def _decoded(loader, index):
    """The pixels `loader`'s backend makes of file `index` (uint8 [3, H, W]), as its workers and
    pipeline do for one file, without views."""
    path = loader.files[index]
    data = decode.read_bytes(path)
    payload = loader._worker_decode()(data, path)
    if not isinstance(payload, dict):
        return payload
    out = {"pixels": [payload], "indices": [index]}
    images, _ = loader._pixels(out, {})
    return images[0].permute(2, 0, 1).cpu()


@pytest.fixture(scope="module")
def reference(folder):
    root, _, _ = folder
    return _epoch(root, "reference", num_workers=2)


@needs_op
@pytest.mark.parametrize("backend", FAST)
def test_every_backend_yields_the_reference_batches(folder, reference, backend):
    root, good, bad = folder
    ref_loader, ref = reference
    loader, got = _epoch(root, backend)
    assert len(got) == len(ref) == len(loader) == -(-len(loader.files) // 4)
    levels = {}  # file index -> max |decoded - reference decode| in 8-bit levels
    for a, b in zip(ref, got):
        # the same samples in the same order, the same substitutes, crop rows and masks: exactly
        for key in ("index", "label", "crops", "keep"):
            assert torch.equal(a[key], b[key]), key
        for i, f in enumerate(b["index"].tolist()):
            if f not in levels:
                ours, theirs = _decoded(loader, f), decode.decode_file(loader.files[f])
                assert ours.shape == theirs.shape, loader.files[f]  # same size and orientation
                levels[f] = (ours.int() - theirs.int()).abs().max().item()
            # views within the decoders' difference: the op vs its twin (~1e-6) where the pixels
            # agree; where not, a level can grow through brightness (x1.4), contrast (x1.8 with the
            # mean's share) and saturation (x1.4): 3.5 levels, 4 with hue's rounding
            tol = 1e-5 + 4 * levels[f] / 255
            for key in ("image", "global_views", "local_views"):
                diff = (a[key][i] - b[key][i]).abs().max().item()
                assert diff <= tol, (backend, key, loader.files[f], diff, levels[f])
    assert set(levels) == {loader.files.index(p) for p in good}  # every good file, no bad one
    assert loader.bad_files.keys() == set(bad) == ref_loader.bad_files.keys()
    assert all(loader.bad_files.values())  # each named with its reason
    # where the decoders may differ at all (measured with torchvision 0.29, DALI 2.4, Pillow 11/12):
    differ = {Path(loader.files[f]).name for f, lv in levels.items() if lv}
    assert differ <= {"cmyk.jpg"}, differ
    assert max(levels.values()) <= 1


def test_substitute_is_the_next_good_file_and_keeps_the_position_draws(folder, reference):
    ref_loader, ref = reference
    files = ref_loader.files
    order = ref_loader.order
    perm = order.permutation(0).tolist()
    index = torch.cat([b["index"] for b in ref]).tolist()
    for p, f in enumerate(perm):  # position p holds file perm[p], or the next good one after it
        want = f
        while files[want] in ref_loader.bad_files:
            want = (want + 1) % len(files)
        assert index[p] == want
    # a substitute has its position's draws, not its own file's: the same file twice, two crops
    twice = [f for f in set(index) if index.count(f) > 1]
    assert twice
    crops = torch.cat([b["crops"][: b["index"].numel()] for b in ref])
    rows = [crops[k] for k, f in enumerate(index) if f == twice[0]]
    assert not torch.equal(rows[0][1:], rows[1][1:])


def per_sample_rows(batch):
    """crops [K, 12] -> Tensor[B, 1 + G + Lc, 11]: each sample's rows (image, global, local), column 0 dropped."""
    B, G, Lc = batch["index"].numel(), SPEC["num_global"], SPEC["num_local"]
    c = batch["crops"][:, 1:]
    return torch.cat([c[:B, None], c[B : B + B * G].view(B, G, -1), c[B + B * G :].view(B, Lc, -1)], dim=1)


@pytest.mark.parametrize("backend", ["reference", pytest.param("torchvision", marks=needs_op)])
def test_two_ranks_read_what_one_process_reads(folder, backend):
    """2 processes x batch b see exactly the samples, crops, colours and masks of 1 x 2b."""
    root, _, _ = folder
    loader, one = _epoch(root, backend, drop_last=True, batch_size=6)
    ranks = [_epoch(root, backend, drop_last=True, batch_size=3, rank=r, world_size=2)[1] for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == len(loader.files) // 6
    for whole, r0, r1 in zip(one, *ranks):
        for key in ("index", "label", "keep", "image", "global_views", "local_views"):
            assert torch.equal(whole[key], torch.cat([r0[key], r1[key]])), key
        assert torch.equal(per_sample_rows(whole), torch.cat([per_sample_rows(r0), per_sample_rows(r1)]))


def test_views_dtype_bfloat16(folder):
    root, _, _ = folder
    kw = {"batch_size": 4, "num_workers": 0, "seed": 11, "device": "cpu", **SPEC}
    f32 = next(iter(build_loader(root, backend="reference", **kw)))
    b16 = next(iter(build_loader(root, backend="reference", dtype="bfloat16", **kw)))
    assert b16["image"].dtype == torch.bfloat16 and torch.equal(b16["crops"], f32["crops"])
    torch.testing.assert_close(b16["global_views"].float(), f32["global_views"], atol=4e-3, rtol=0)


# ---------------------------------------------------------------------------------------------
# on a GPU (`make gpu` runs these): nvJPEG and DALI "mixed" on the loader's own device
# ---------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@needs_cuda
@needs_op
@pytest.mark.parametrize("backend", FAST)
def test_gpu_backends_yield_the_reference_batches(folder, reference, backend):
    root, _, bad = folder
    _, ref = reference
    device = torch.device("cuda", torch.cuda.device_count() - 1)  # not device 0 where there are several
    loader, got = _epoch(root, backend, device=device)
    assert loader.device == device and len(got) == len(ref)
    levels = {}
    for a, b in zip(ref, got):
        for key in ("index", "label", "crops", "keep"):
            assert b[key].device.type == "cpu" and torch.equal(a[key], b[key]), key
        for i, f in enumerate(b["index"].tolist()):
            if f not in levels:
                ours, theirs = _decoded(loader, f), decode.decode_file(loader.files[f])
                assert ours.shape == theirs.shape, loader.files[f]
                levels[f] = (ours.int() - theirs.int()).abs().max().item()
            for key in ("image", "global_views", "local_views"):
                assert b[key].device == device
                diff = (a[key][i] - b[key][i].cpu()).abs().max().item()
                assert diff <= 1e-5 + 4 * levels[f] / 255, (backend, key, loader.files[f], diff, levels[f])
    assert loader.bad_files.keys() == set(bad)
    print(f"{backend} on {device}: max decoded difference per file (levels):",
          {Path(loader.files[f]).name: lv for f, lv in levels.items() if lv})


@needs_cuda
def test_gpu_loader_takes_local_rank_device(folder, monkeypatch):
    root, _, _ = folder
    last = torch.cuda.device_count() - 1
    monkeypatch.setenv("LOCAL_RANK", str(last))
    # a bare "cuda" is this process's device (LOCAL_RANK under torchrun), never device 0 by default
    loader = build_loader(root, backend="reference", device="cuda", batch_size=4, **SPEC)
    assert loader.device == torch.device("cuda", last) and loader.pin_memory
    batch = next(iter(loader))
    assert batch["image"].device == loader.device and batch["keep"].is_pinned()

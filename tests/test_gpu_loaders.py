"""The `torchvision` and `dali` loader backends end to end on the CPU: the batch dict, the views
against the plain PyTorch reference, skipped files, shards, resume, and both backends agreeing."""
import warnings

import pytest
import torch
from test_check import make_image_folder

from stellar import _ext
from stellar.data import augment, check, gpu_loaders
from stellar.data.loader import build_loader

needs_op = pytest.mark.skipif(
    not _ext.is_available(),
    reason="stellar._C is not built (`python setup.py build_ext --inplace`): the loaders run torch.ops.stellar.multicrop",
)
needs_dali = pytest.mark.skipif(
    not gpu_loaders._dali.dali_available(), reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)"
)
BACKENDS = ["torchvision", pytest.param("dali", marks=needs_dali)]
SMALL = dict(batch_size=3, num_workers=0, global_size=12, local_size=8, num_global=2, num_local=3, device="cpu", seed=3)


def _build(root, backend, **kw):
    kw = {**SMALL, **kw}
    return (gpu_loaders.build_dali_loader if backend == "dali" else gpu_loaders.build_torchvision_loader)(root, **kw)


def _quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args)


def _decode(paths, backend):
    """uint8 [3, H, W] images decoded as `backend` does (CMYK -> RGB rounds differently in DALI)."""
    if backend == "dali":
        pipe = gpu_loaders._dali.build_pipeline(paths, batch_size=len(paths), num_threads=1)
        return [im.permute(2, 0, 1).clone() for im in gpu_loaders._dali.run_to_torch(pipe)[0]]
    from torchvision.io import read_file

    return [check.decode_rgb(read_file(p)) for p in paths]


def _reference_batch(images, crops, B, kw):
    """The views of `images` by augment.apply_crops (float64) from the rows the loader used."""
    G, Lc, S, s = kw["num_global"], kw["num_local"], kw["global_size"], kw["local_size"]
    big = augment.apply_crops(images, crops[: B * (1 + G)], S, normalize=False, dtype=torch.float64)
    local = augment.apply_crops(images, crops[B * (1 + G) :], s, normalize=False, dtype=torch.float64)
    return big[:B], big[B:].view(B, G, 3, S, S), local.view(B, Lc, 3, s, s)


@needs_op
@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_match_the_reference_views(tmp_path, backend):
    good, bad = make_image_folder(tmp_path)
    loader = _build(tmp_path, backend, drop_last=False, shuffle=False)
    assert loader.skipped == len(bad)  # the folder was checked before the first epoch
    files = loader.epoch_files()
    assert sorted(files) == good
    G, Lc, S, s = SMALL["num_global"], SMALL["num_local"], SMALL["global_size"], SMALL["local_size"]
    n = 0
    for batch in loader:
        B = batch["label"].shape[0]
        assert batch["image"].shape == (B, 3, S, S) and batch["image"].dtype == torch.float32
        assert batch["global_views"].shape == (B, G, 3, S, S)
        assert batch["local_views"].shape == (B, Lc, 3, s, s)
        assert batch["crops"].shape == (B * (1 + G + Lc), 12)
        paths = files[n : n + B]
        assert batch["label"].tolist() == [loader.labels[loader.files.index(p)] for p in paths]
        for name in ("image", "global_views", "local_views"):
            v = batch[name]
            assert torch.isfinite(v).all() and v.min() >= 0 and v.max() <= 1, name  # views in [0, 1]
        ref = _reference_batch(_decode(paths, backend), batch["crops"], B, SMALL)
        for got, want in zip((batch["image"], batch["global_views"], batch["local_views"]), ref):
            torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=0)
        n += B
    assert n == len(good)


@needs_op
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("drop_last", [True, False])
def test_runtime_failures_are_skipped_and_counted(tmp_path, backend, drop_last):
    good, bad = make_image_folder(tmp_path)
    loader = _build(tmp_path, backend, drop_last=drop_last, check=False)
    assert loader.skipped == 0 and not (tmp_path / "train" / check.BAD_LIST_NAME).exists()
    batches = _quiet(list, loader)
    sizes = [b["label"].shape[0] for b in batches]
    assert sum(sizes) == (len(good) // 3 * 3 if drop_last else len(good))
    assert all(n == 3 for n in sizes[:-1]) and 1 <= sizes[-1] <= 3  # full batches despite the skips
    runtime_bad = loader.state_dict()["runtime_bad"]
    assert loader.skipped == len(runtime_bad)
    if drop_last:  # a bad file in the dropped tail is never read
        assert set(runtime_bad) <= set(bad) and len(runtime_bad) >= 1
    else:
        assert sorted(runtime_bad) == bad


@needs_op
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_yields_the_same_batches(tmp_path, backend):
    make_image_folder(tmp_path, n_per_class=4)
    loader = _build(tmp_path, backend, batch_size=2)
    full = _quiet(list, loader)
    loader.set_epoch(0)
    it = iter(loader)
    head = [next(it) for _ in range(2)]
    resumed = _build(tmp_path, backend, batch_size=2)
    resumed.load_state_dict(loader.state_dict())
    resumed.set_epoch(0)  # the current epoch keeps its position
    rest = _quiet(list, resumed)
    assert len(head) + len(rest) == len(full) == len(loader)
    for a, b in zip(head + rest, full):
        assert torch.equal(a["crops"], b["crops"]) and torch.equal(a["label"], b["label"])
        assert torch.equal(a["local_views"], b["local_views"])
    assert resumed.state_dict()["epoch"] == 1


@needs_op
@needs_dali
def test_dali_and_torchvision_backends_agree(tmp_path):
    make_image_folder(tmp_path)
    (tmp_path / "train" / "c0" / "cmyk.jpg").unlink()  # the decoders round CMYK -> RGB differently
    a = _quiet(list, _build(tmp_path, "dali", drop_last=False))
    b = _quiet(list, _build(tmp_path, "torchvision", drop_last=False))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["crops"], y["crops"]) and torch.equal(x["label"], y["label"])
        torch.testing.assert_close(x["global_views"], y["global_views"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_are_disjoint_and_cover(tmp_path, backend, world_size):
    good, _ = make_image_folder(tmp_path, n_per_class=4)
    for epoch in (0, 1):
        shards = [
            _build(tmp_path, backend, rank=r, world_size=world_size, views="reference").epoch_files(epoch)
            for r in range(world_size)
        ]
        assert sorted(sum(shards, [])) == good
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_torchvision_decodes_every_kind_in_workers(tmp_path):
    good, bad = make_image_folder(tmp_path)
    loader = _build(tmp_path, "torchvision", num_workers=2, drop_last=False, check=False, views="reference")
    seen = []
    for images, labels in _quiet(list, loader.iter_decoded()):
        assert all(im.dtype == torch.uint8 and im.shape[2] == 3 for im in images)
        seen += labels.tolist()
    assert sorted(seen) == sorted(lab for f, lab in zip(loader.files, loader.labels) if f in good)
    assert loader.skipped == len(bad)


def test_build_loader_dispatches_and_checks_arguments(tmp_path):
    make_image_folder(tmp_path, bad=False)
    loader = build_loader(tmp_path, backend="torchvision", batch_size=2, num_workers=0, device="cpu", views="reference")
    assert isinstance(loader, gpu_loaders.TorchvisionLoader)
    with pytest.raises(ValueError, match="batch_size"):
        _build(tmp_path, "torchvision", batch_size=0)
    with pytest.raises(ValueError, match="views"):
        _build(tmp_path, "torchvision", views="fast")
    with pytest.raises(ValueError, match="rank"):
        _build(tmp_path, "torchvision", rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="bad_list"):
        _build(tmp_path, "torchvision", bad_list=tmp_path / "none.txt")

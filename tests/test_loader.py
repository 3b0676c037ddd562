"""The loaders' shared behaviour, on every backend: batch layout, the one sample order, exact
resume (also on another world size), bad files skipped and counted, arguments."""
import numpy as np
import pytest
import torch
from PIL import Image

from stellar import _ext
from stellar.data import augment, dali
from stellar.data.decode import decode_file
from stellar.data.draws import crop_rows, draw_samples
from stellar.data.loader import build_loader, pick_backend
from stellar.data.order import SampleOrder
from stellar.data.spec import ViewSpec

SMALL = dict(batch_size=3, global_size=16, local_size=8, num_global=3, num_local=2, patch_size=4, num_workers=0,
             device="cpu")
BACKENDS = [
    "reference",
    pytest.param("torchvision", marks=pytest.mark.skipif(not _ext.is_available(), reason="stellar._C is not built")),
    pytest.param("dali", marks=pytest.mark.skipif(not (dali.dali_status()[0] and _ext.is_available()),
                                                  reason="NVIDIA DALI does not import, or stellar._C is not built")),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train/<class>/ with 11 images of assorted sizes (one smaller than a crop) and one corrupt file."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(11):
        cls = root / "train" / f"c{i % 3}"
        cls.mkdir(parents=True, exist_ok=True)
        h, w = (5, 6) if i == 4 else (int(rng.integers(20, 40)), int(rng.integers(20, 40)))
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(cls / f"{i}.png")
    (root / "train" / "c1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def load(root, backend="reference", **kw):
    return build_loader(root, backend=backend, **{**SMALL, **kw})


def collect(loader, n=None):
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_batch_layout_and_range(folder):
    loader = load(folder)
    assert len(loader) == 12 // 3
    batch = next(iter(loader))
    B, G, Lc = 3, 3, 2
    assert batch["image"].shape == (B, 3, 16, 16)
    assert batch["global_views"].shape == (B, G, 3, 16, 16)
    assert batch["local_views"].shape == (B, Lc, 3, 8, 8)
    assert batch["label"].shape == (B,) and batch["label"].dtype == torch.long
    assert batch["index"].shape == (B,) and batch["index"].dtype == torch.long
    assert batch["crops"].shape == (B * (1 + G + Lc), 12) and batch["crops"].dtype == torch.float32
    n_keep = int(16 * (1 - 0.8))  # a 4 x 4 grid at mask_ratio 0.8: 3 patches
    assert batch["keep"].shape == (B, G, n_keep) and batch["keep"].dtype == torch.long
    assert (batch["keep"].diff(dim=-1) > 0).all() and batch["keep"].max() < 16
    for k in ("image", "global_views", "local_views"):
        v = batch[k]
        assert v.dtype == torch.float32 and v.min() >= 0 and v.max() <= 1 and v.std() > 0.05
    assert torch.equal(batch["label"], loader.labels[batch["index"]])


def test_views_are_the_draws_applied_to_the_decoded_file(folder):
    """The reference batch against an independent recomputation: decode, draws of (seed, epoch,
    position), rows for the decoded size, apply_crops in float64."""
    loader = load(folder, seed=4)
    batch = next(iter(loader))
    spec = loader.spec
    positions = list(range(3))  # rank 0, world 1: the first global batch is positions 0..2
    assert batch["index"].tolist() == loader.order.permutation(0)[:3].tolist()  # no bad file among them here
    images = [decode_file(loader.files[i]) for i in batch["index"].tolist()]
    draws = draw_samples(spec, 4, 0, positions)
    rows = crop_rows(spec, draws, [im.shape[1:] for im in images])
    assert torch.equal(batch["crops"], rows) and torch.equal(batch["keep"], draws.keep)
    B, G = 3, 3
    big = augment.apply_crops(images, rows[: B * (1 + G)], 16, normalize=False, dtype=torch.float64)
    torch.testing.assert_close(batch["image"].double(), big[:B], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch["global_views"].double(), big[B:].view(B, G, 3, 16, 16), atol=1e-5, rtol=0)
    # the first global view: `image`'s window and flip, its own colours
    assert torch.equal(rows[B : B + B * G : G, 1:6], rows[:B, 1:6])
    assert (rows[:B, augment.BRIGHTNESS:] == torch.tensor([1.0, 1, 1, 0, 0, 0])).all()


def test_deterministic_and_epochs_differ(folder):
    a, b = collect(load(folder)), collect(load(folder, num_workers=2))
    for x, y in zip(a, b):
        assert_same(x, y)
    loader = load(folder)
    e0 = collect(loader)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0
    e1 = collect(loader)
    assert not torch.equal(e0[0]["index"], e1[0]["index"])
    other_seed = collect(load(folder, seed=1))
    assert not torch.equal(e0[0]["crops"], other_seed[0]["crops"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_mid_epoch_resume(folder, backend):
    full = load(folder, backend)
    full.set_epoch(1)
    epoch1 = collect(full)
    first = load(folder, backend)
    first.set_epoch(1)
    head = collect(first, 2)
    state = first.state_dict()
    assert state == {"epoch": 1, "position": 6, "seed": 0, "global_batch": 3}  # one format on every backend
    resumed = load(folder, backend, num_workers=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # a trainer re-announcing the epoch keeps the position
    tail = collect(resumed)
    assert len(head) + len(tail) == len(epoch1) == len(full)
    for x, y in zip(head + tail, epoch1):
        assert_same(x, y)
    assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["position"] == 0
    # a checkpoint taken after the last batch of an epoch resumes at the next epoch
    end = load(folder, backend)
    end.load_state_dict({"epoch": 0, "position": 12})
    assert_same(next(iter(end)), epoch1[0])


def test_resume_on_another_world_size_continues_the_global_stream(folder):
    """Saved by 1 process with batch 4 after 1 step, resumed by 2 processes with batch 2: the same
    global batches (the trainer hands each rank the saved state)."""
    whole = collect(load(folder, batch_size=4))
    one = load(folder, batch_size=4)
    collect(one, 1)
    state = one.state_dict()
    ranks = [load(folder, batch_size=2, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    tails = [collect(r) for r in ranks]
    assert len(tails[0]) == len(tails[1]) == len(whole) - 1
    for step, (a, b) in enumerate(zip(*tails)):
        for key in ("index", "keep", "image", "global_views", "local_views"):
            assert torch.equal(whole[step + 1][key], torch.cat([a[key], b[key]])), key


def test_state_of_another_stream_is_refused(folder):
    loader = load(folder)
    with pytest.raises(ValueError, match="seed"):
        loader.load_state_dict({"epoch": 0, "position": 3, "seed": 7})
    with pytest.raises(ValueError, match="position"):
        loader.load_state_dict({"epoch": 0, "batch": 1})  # an old reference loader's state
    with pytest.raises(ValueError, match="past the end"):
        loader.load_state_dict({"epoch": 0, "position": 99})


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_file_skipped_counted_and_substituted(folder, backend):
    loader = load(folder, backend, drop_last=False, num_workers=2 if backend == "reference" else 0)
    assert loader.skipped == 0
    batches = collect(loader)
    assert loader.skipped == 1
    [(path, reason)] = loader.bad_files.items()
    assert path.endswith("broken.jpg") and "JPEG" in reason
    bad = loader.files.index(path)
    index = torch.cat([b["index"] for b in batches]).tolist()
    assert bad not in index and len(index) == 12
    assert index.count((bad + 1) % 12) == 2  # its sample took the next file of the sorted list


def test_listed_files_are_not_read(folder, tmp_path, monkeypatch):
    """A `stellar data check` list is read by every backend alike: its files are substituted."""
    from stellar.data import check

    loader = load(folder, drop_last=False)
    listed = loader.files[5]
    out = tmp_path / "bad.txt"
    check.write_bad_list(out, {listed: "listed for the test"})
    index = torch.cat([b["index"] for b in collect(load(folder, drop_last=False, bad_list=out))]).tolist()
    assert 5 not in index and index.count(6) == 2
    with pytest.raises(FileNotFoundError, match="bad_list"):
        load(folder, bad_list=tmp_path / "missing.txt")


def test_iterating_leaves_the_global_rng_alone(folder):
    torch.manual_seed(123)
    expect = torch.rand(3)
    torch.manual_seed(123)
    collect(load(folder, num_workers=1), 2)
    assert torch.equal(torch.rand(3), expect)


# ---------------------------------------------------------------------------------------------
# the order itself
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_each_rank_takes_its_rows_of_every_global_batch(world_size):
    n, b = 23, 2
    orders = [SampleOrder(n, b, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    perm = orders[0].permutation(3)
    assert sorted(perm.tolist()) == list(range(n))
    assert torch.equal(perm, SampleOrder(n, 1, seed=5).permutation(3))  # the same on any world size
    gb = b * world_size
    for r, order in enumerate(orders):
        slices = order.slices(3)
        assert len(slices) == len(order) == n // gb
        for k, sl in enumerate(slices):
            assert sl.positions == tuple(range(k * gb + r * b, k * gb + (r + 1) * b))
            assert sl.indices == tuple(perm[list(sl.positions)].tolist()) and sl.end == (k + 1) * gb


def test_without_drop_last_the_tail_is_cut_the_same_way():
    n, b, W = 11, 2, 3  # global batch 6: one full, then 5 -> ranks take 2, 2, 1
    orders = [SampleOrder(n, b, rank=r, world_size=W, drop_last=False, shuffle=False) for r in range(W)]
    assert [len(o) for o in orders] == [2, 2, 2]
    assert [o.slices(0)[-1].positions for o in orders] == [(6, 7), (8, 9), (10,)]
    tiny = [SampleOrder(7, 2, rank=r, world_size=W, drop_last=False, shuffle=False) for r in range(W)]
    assert [len(o) for o in tiny] == [2, 1, 1]  # the tail (1 sample) goes to rank 0 only
    with pytest.raises(ValueError, match="no batch"):
        SampleOrder(5, 2, world_size=3)


def test_bad_arguments(folder):
    with pytest.raises(ValueError, match="backend"):
        build_loader(folder, backend="nope")
    with pytest.raises(ValueError, match="batch_size"):
        load(folder, batch_size=100)
    with pytest.raises(ValueError, match="rank"):
        load(folder, rank=2, world_size=2)
    with pytest.raises(ValueError, match="local_scale"):
        load(folder, local_scale=(0.5,))
    with pytest.raises(ValueError, match="global_size"):
        load(folder, global_size=18)  # not a multiple of the patch size 4
    with pytest.raises(ValueError, match="views"):
        load(folder, views="fast")
    with pytest.raises(TypeError, match="unknown"):
        build_loader(folder, **SMALL, colour=True)
    with pytest.raises(TypeError, match="both"):
        build_loader(folder, spec=ViewSpec(), global_size=16)


def test_auto_backend_on_cpu_is_reference():
    assert pick_backend("cpu")[0] == "reference"


def test_auto_backend_reports_a_broken_dali(monkeypatch):
    """A DALI that is installed but does not import is warned about with its reason (never silent)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dali, "dali_status", lambda: (False, "OSError: libcudart.so.13: cannot open shared object file"))
    with pytest.warns(RuntimeWarning, match="libcudart"):
        backend, why = pick_backend(torch.device("cuda", 0))
    assert backend == "torchvision" and "libcudart" in why
    monkeypatch.setattr(dali, "dali_status", lambda: (False, "ModuleNotFoundError: No module named 'nvidia'"))
    assert pick_backend(torch.device("cuda", 0)) == ("torchvision", "DALI is not installed (ModuleNotFoundError: "
                                                     "No module named 'nvidia')")


def test_a_cpu_only_extension_is_refused_for_gpu_views(monkeypatch):
    from stellar.data import multicrop

    monkeypatch.setattr(_ext, "is_available", lambda: True)
    monkeypatch.setattr(_ext, "extension_info", lambda: {"built": True, "cuda": False, "error": None})
    with pytest.raises(RuntimeError, match="built without CUDA.*STELLAR_FORCE_CUDA"):
        multicrop.resolve_views("op", "cuda:0")
    with pytest.warns(RuntimeWarning, match="built without CUDA"):
        assert multicrop.resolve_views("auto", "cuda:0") == "torch"
    assert multicrop.resolve_views("op", "cpu") == "op"

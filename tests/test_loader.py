"""The reference multi-crop loader: batch layout, determinism, exact resume, skipped files."""
import numpy as np
import pytest
import torch
from PIL import Image

from stellar.data import build_loader
from stellar.data.loader import ReferenceLoader, pick_backend, stream_seed

SMALL = dict(backend="reference", batch_size=3, global_size=16, local_size=8, num_global=3, num_local=2, num_workers=0)


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
    loader = build_loader(folder, **SMALL)
    assert isinstance(loader, ReferenceLoader)
    assert len(loader) == 12 // 3
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 3, 16, 16)
    assert batch["global_views"].shape == (3, 3, 3, 16, 16)
    assert batch["local_views"].shape == (3, 2, 3, 8, 8)
    assert batch["label"].shape == (3,) and batch["label"].dtype == torch.long
    for k in ("image", "global_views", "local_views"):
        v = batch[k]
        assert v.dtype == torch.float32 and v.min() >= 0 and v.max() <= 1 and v.std() > 0.05


def test_first_global_view_is_the_image_crop_plus_colour(folder):
    loader = build_loader(folder, **SMALL)
    from stellar.data import augment

    key_epoch, index = 0, loader.indices(0)[0]
    ds = loader.dataset
    image, _, _ = ds.load(index)
    gen = torch.Generator().manual_seed(stream_seed(loader.seed, key_epoch, index))
    rows = augment.sample_multicrop_params([tuple(image.shape[1:])], gen, num_global=3, num_local=2)
    uncoloured = rows["global"][:1].clone()
    uncoloured[:, augment.BRIGHTNESS:] = rows["image"][:, augment.BRIGHTNESS:]
    batch = next(iter(loader))
    first = augment.apply_crops([image], uncoloured, 16, normalize=False)[0]
    assert torch.equal(batch["image"][0], first)
    assert torch.equal(batch["global_views"][0, 0], augment.apply_crops([image], rows["global"][:1], 16, normalize=False)[0])


def test_deterministic_and_epochs_differ(folder):
    a = collect(build_loader(folder, **SMALL))
    b = collect(build_loader(folder, **SMALL))
    for x, y in zip(a, b):
        assert_same(x, y)
    loader = build_loader(folder, **SMALL)
    e0 = collect(loader)
    assert loader.state_dict() == {"epoch": 1, "batch": 0}
    e1 = collect(loader)
    assert not torch.equal(e0[0]["image"], e1[0]["image"])
    other_seed = collect(build_loader(folder, **{**SMALL, "seed": 1}))
    assert not torch.equal(e0[0]["image"], other_seed[0]["image"])


def test_exact_mid_epoch_resume_with_workers(folder):
    full = collect(build_loader(folder, **SMALL))
    loader = build_loader(folder, **SMALL)
    loader.set_epoch(1)
    epoch1 = collect(loader)
    first = build_loader(folder, **SMALL)
    first.set_epoch(1)
    head = collect(first, 2)
    state = first.state_dict()
    assert state == {"epoch": 1, "batch": 2}
    resumed = build_loader(folder, **{**SMALL, "num_workers": 2})
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # a trainer re-announcing the epoch keeps the position
    tail = collect(resumed)
    assert len(head) + len(tail) == len(epoch1) == len(full)
    for x, y in zip(head + tail, epoch1):
        assert_same(x, y)
    assert resumed.state_dict() == {"epoch": 2, "batch": 0}
    # a checkpoint taken after the last batch of an epoch resumes at the next epoch
    end = build_loader(folder, **SMALL)
    end.load_state_dict({"epoch": 0, "batch": len(end)})
    assert_same(next(iter(end)), epoch1[0])


def test_corrupt_file_counted_across_worker_processes(folder):
    loader = build_loader(folder, **{**SMALL, "num_workers": 2, "drop_last": False})
    assert loader.skipped == 0
    collect(loader)
    assert loader.skipped == 1
    assert loader.bad_paths[0].endswith("broken.jpg")


def test_iterating_leaves_the_global_rng_alone(folder):
    torch.manual_seed(123)
    expect = torch.rand(3)
    torch.manual_seed(123)
    collect(build_loader(folder, **{**SMALL, "num_workers": 1}), 2)
    assert torch.equal(torch.rand(3), expect)


def test_shards_partition_an_epoch(folder):
    kw = {**SMALL, "batch_size": 2}
    ranks = [build_loader(folder, rank=r, world_size=2, **kw) for r in range(2)]
    idx = [set(r.indices(0)) for r in ranks]
    assert not idx[0] & idx[1] and len(idx[0]) == len(idx[1]) == 6
    assert len(ranks[0]) == 3


def test_bad_arguments(folder):
    with pytest.raises(ValueError, match="backend"):
        build_loader(folder, backend="nope")
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(folder, **{**SMALL, "batch_size": 100})
    with pytest.raises(ValueError, match="rank"):
        build_loader(folder, **{**SMALL, "rank": 2, "world_size": 2})
    with pytest.raises(ValueError, match="scale"):
        build_loader(folder, **{**SMALL, "local_scale": (0.5,)})
    with pytest.raises(TypeError, match="unknown"):
        build_loader(folder, **SMALL, colour=True)


def test_auto_backend_on_cpu_is_reference():
    if torch.cuda.is_available():
        pytest.skip("CUDA machine: auto picks a GPU backend")
    assert pick_backend() == "reference"

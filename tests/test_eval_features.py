"""Feature extraction for evaluation: values, the on-disk cache (reuse, invalidation, resume), ranks."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from stellar.data.folder import ImageFolderDataset
from stellar.eval.features import FeatureCache, extract
from stellar.eval.knn import prepare_images
from stellar.model import build_model

TINY = {"arch": "tiny", "dim": 32, "depth": 1, "heads": 2, "patch_size": 8, "img_size": 16, "num_tokens": 3,
        "decoder": {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32},
        "clustering": {"hidden": 16, "bottleneck": 8, "prototypes": 8}}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model(TINY).eval()


def make_folder(root, n=10, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    return ImageFolderDataset(root)


class Counting(torch.nn.Module):
    """Wraps a model; counts encoded images and can fail after ``fail_after`` calls."""

    def __init__(self, model, fail_after=None):
        super().__init__()
        self.model, self.images, self.calls, self.fail_after = model, 0, 0, fail_after

    def encode(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.images += x.shape[0]
        return self.model.encode(x)


def want_features(model, ds, size):
    x = prepare_images([ds[i][0] for i in range(len(ds))], size)
    with torch.no_grad():
        out = model.encode(x)
    return out, torch.tensor(ds.labels)


def test_extract_gives_every_kind_in_dataset_order(tmp_path):
    ds = make_folder(tmp_path / "data")
    model = tiny_model()
    feats = extract(model, ds, ("pooled", "cls", "sparse", "L", "Z"), 16, batch_size=4, chunk_size=3,
                    progress=False)
    out, labels = want_features(model, ds, 16)
    torch.testing.assert_close(feats["pooled"], out["sparse"].mean(1))
    torch.testing.assert_close(feats["cls"], out["cls"][:, 0])
    torch.testing.assert_close(feats["sparse"], out["sparse"])
    torch.testing.assert_close(feats["L"], out["L"])
    torch.testing.assert_close(feats["Z"], out["Z"])
    assert feats["label"].tolist() == labels.tolist() and feats["Z"].shape == (10, 4, 32)
    with pytest.raises(ValueError, match="kinds"):
        extract(model, ds, ("nope",), 16)


def test_cache_is_reused_invalidated_and_resumed(tmp_path):
    ds = make_folder(tmp_path / "data")
    model = tiny_model()
    settings = {"kinds": ["pooled"], "image_size": 16}
    cache_dir = tmp_path / "cache"
    run = dict(kinds=("pooled",), image_size=16, batch_size=4, chunk_size=3, progress=False)

    counting = Counting(model)
    cache = FeatureCache.for_model(cache_dir, model, ds, settings, checkpoint="ckpt")
    first = extract(counting, ds, cache=cache, **run)
    assert counting.images == 10 and cache.has_final() and not list(cache.dir.glob("chunk_*"))

    # Same weights, data and settings: read back, nothing encoded.
    again = Counting(model, fail_after=0)
    same = FeatureCache.for_model(cache_dir, model, ds, settings, checkpoint="ckpt")
    assert same.key == cache.key
    torch.testing.assert_close(extract(again, ds, cache=same, **run)["pooled"], first["pooled"])

    # New weights (a later checkpoint at the same path): a new key; the old entry of the slot goes away.
    with torch.no_grad():
        model.encoder.sparse_tokens.add_(0.5)
    changed = FeatureCache.for_model(cache_dir, model, ds, settings, checkpoint="ckpt")
    assert changed.key != cache.key
    counting = Counting(model)
    new = extract(counting, ds, cache=changed, **run)
    assert counting.images == 10 and not torch.allclose(new["pooled"], first["pooled"])
    assert not cache.dir.exists() and changed.has_final()

    # Other data or settings: other keys.
    assert FeatureCache.for_model(cache_dir, model, ds, {**settings, "image_size": 24}).key != changed.key
    ds2 = make_folder(tmp_path / "data2", n=11)
    assert FeatureCache.for_model(cache_dir, model, ds2, settings).key != changed.key

    # A crash after 2 batches (8 images): chunks 0 and 1 (6 images) are on disk; the rerun does the rest.
    with torch.no_grad():
        model.encoder.sparse_tokens.add_(0.5)
    crash = FeatureCache.for_model(cache_dir, model, ds, settings)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(Counting(model, fail_after=2), ds, cache=crash, **run)
    assert sorted(p.name for p in crash.dir.glob("chunk_*")) == ["chunk_000000.safetensors", "chunk_000001.safetensors"]
    counting = Counting(model)
    resumed = extract(counting, ds, cache=crash, **run)
    assert counting.images == 4
    out, _ = want_features(model, ds, 16)
    torch.testing.assert_close(resumed["pooled"], out["sparse"].mean(1))

    with pytest.raises(ValueError, match="fingerprint"):
        FeatureCache.for_model(cache_dir, model, [(torch.zeros(3, 4, 4), 0)], settings)


def _rank_main(rank, world, port, data_root, cache_dir, out_dir):
    """One rank of a torchrun-like launch: the eval commands' process group, then extraction."""
    import torch.distributed as dist

    from stellar.eval.features import eval_process_group

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with eval_process_group(torch.device("cpu"), timeout_s=60):
        assert dist.is_initialized() and dist.get_backend() == "gloo" and dist.get_world_size() == world
        ds = ImageFolderDataset(data_root)
        model = tiny_model()
        cache = FeatureCache.for_model(cache_dir, model, ds, {"kinds": ["pooled", "L"]})
        counting = Counting(model)
        feats = extract(counting, ds, ("pooled", "L"), 16, batch_size=2, chunk_size=3, cache=cache, progress=False)
    assert not dist.is_initialized()
    torch.save({"images": counting.images, "feats": feats}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_ranks_split_the_work_and_rank0_gets_everything(tmp_path):
    import socket

    ds = make_folder(tmp_path / "data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_main, args=(2, port, str(tmp_path / "data"), str(tmp_path / "cache"),
                                                  str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r1["feats"] is None
    assert (r0["images"], r1["images"]) == (6, 4)        # chunks 0, 2 (3 + 3) and 1, 3 (3 + 1)
    out, labels = want_features(tiny_model(), ds, 16)
    torch.testing.assert_close(r0["feats"]["pooled"], out["sparse"].mean(1))
    torch.testing.assert_close(r0["feats"]["L"], out["L"])
    assert r0["feats"]["label"].tolist() == labels.tolist()


def test_a_cuda_device_is_this_process_gpu(monkeypatch):
    """Under torchrun, "auto" and a bare "cuda" are cuda:LOCAL_RANK (never device 0 on every rank)."""
    from stellar.eval.features import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cpu") == torch.device("cpu")

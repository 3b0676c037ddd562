"""The DALI CPU pipeline end to end on a folder of JPEG, PNG, grayscale, CMYK and broken files."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from test_check import make_image_folder

from stellar.data import check, dali

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")

from stellar.data.gpu_loaders import DaliLoader, build_dali_loader, list_image_folder  # noqa: E402


def _pil_rgb(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB")))


def _same_image(a, b):
    """Equal up to the CMYK -> RGB rounding of the decoders (PIL and libjpeg-turbo differ by 1)."""
    return a.shape == b.shape and (a.int() - b.int()).abs().max().item() <= 2


def _loader(root, **kw):
    kw = {"batch_size": 3, "num_workers": 1, "device": "cpu", "seed": 5, "views": "reference", **kw}
    return DaliLoader(root, **kw)


def _epoch(loader):
    """Files (absolute paths) of one epoch in order, images checked against PIL on the way."""
    decodable = {}
    for f, lab in zip(loader.files, loader.labels):
        try:
            decodable[f] = (lab, _pil_rgb(f))
        except OSError:
            pass
    seen = []
    for images, labels in loader.iter_decoded():
        assert len(images) == len(labels)
        for img, label in zip(images, labels.tolist()):
            # which file: the label and the pixels must agree with exactly one listed file
            assert img.dtype == torch.uint8 and img.dim() == 3 and img.shape[2] == 3
            matches = [f for f, (lab, ref) in decodable.items() if lab == label and _same_image(ref, img)]
            assert len(matches) == 1, "a decoded image matches no file of its class"
            seen.append(matches[0])
    return seen


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_reader_shards_are_disjoint_and_cover(tmp_path, num_shards):
    good, _ = make_image_folder(tmp_path, n_per_class=4, bad=False)
    seen = []
    for shard in range(num_shards):
        pipe = dali.build_pipeline(good, batch_size=2, shard_id=shard, num_shards=num_shards, num_threads=1)
        start, end = dali.shard_range(len(good), shard, num_shards)
        got = []
        for _ in range(-(-(end - start) // 2)):
            images, index = dali.run_to_torch(pipe)
            got += index.tolist()[: end - start - len(got)]
        assert got == list(range(start, end))  # DALI's split is the one shard_range computes
        seen += got
    assert sorted(seen) == list(range(len(good)))


def test_pipeline_decodes_every_kind_to_rgb_without_a_copy(tmp_path):
    good, _ = make_image_folder(tmp_path, bad=False)
    pipe = dali.build_pipeline(good, batch_size=len(good), num_threads=1)
    images, index = dali.run_to_torch(pipe)
    assert index.tolist() == list(range(len(good)))
    for path, img in zip(good, images):
        assert _same_image(img, _pil_rgb(path)), path  # grayscale / CMYK / alpha PNG -> RGB
        if not path.endswith("cmyk.jpg"):
            assert torch.equal(img, _pil_rgb(path)), path
    raw, _ = pipe.run()  # the torch tensors alias DALI's buffers
    aliased = [torch.from_dlpack(raw[i]) for i in range(len(raw))]
    assert all(t.data_ptr() == raw[i].data_ptr() for i, t in enumerate(aliased))


def test_failed_file_names_the_file(tmp_path):
    _, bad = make_image_folder(tmp_path)
    truncated = [p for p in bad if p.endswith("trunc.jpg")]
    pipe = dali.build_pipeline(truncated, batch_size=1, num_threads=1)
    with pytest.raises(RuntimeError) as info:
        dali.run_to_torch(pipe)
    assert dali.failed_file(info.value) == truncated[0]


def test_loader_skips_listed_files_before_the_first_epoch(tmp_path):
    good, bad = make_image_folder(tmp_path)
    loader = _loader(tmp_path, drop_last=False)
    assert (tmp_path / "train" / check.BAD_LIST_NAME).is_file()  # checked before the first epoch
    assert loader.skipped == len(bad)
    assert len(loader) == -(-len(good) // 3)
    seen = _epoch(loader)
    assert sorted(seen) == good and len(seen) == len(good)
    assert loader.rebuilds == 0


def test_loader_recovers_from_decode_failures_without_losing_the_epoch(tmp_path):
    good, bad = make_image_folder(tmp_path)
    loader = _loader(tmp_path, drop_last=False, check=False)  # no list: the failures happen at run time
    assert loader.skipped == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen = _epoch(loader)
    assert sorted(seen) == good  # every good file once, none lost to a rebuild
    assert loader.skipped == len(bad) and loader.rebuilds >= 1
    assert sum("skipping" in str(w.message) for w in caught) == len(bad)
    assert sorted(loader.state_dict()["runtime_bad"]) == bad
    again = _epoch(loader)  # the next epoch leaves them out up front: no rebuild
    rebuilds = loader.rebuilds
    assert sorted(again) == good and loader.rebuilds == rebuilds and again != seen  # reshuffled


def test_loader_full_batches_with_drop_last_and_resume(tmp_path):
    good, _ = make_image_folder(tmp_path, n_per_class=4)
    loader = _loader(tmp_path, batch_size=2, drop_last=True, check=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = [labels.tolist() for _, labels in loader.iter_decoded()]
        assert all(len(b) == 2 for b in full) and len(full) == len(good) // 2
        loader.set_epoch(0)
        it = loader.iter_decoded()
        first = [next(it)[1].tolist() for _ in range(2)]
        state = loader.state_dict()
        resumed = _loader(tmp_path, batch_size=2, drop_last=True, check=False)
        resumed.load_state_dict(state)
        rest = [labels.tolist() for _, labels in resumed.iter_decoded()]
    assert first + rest == full
    assert resumed.skipped == loader.skipped


def test_loader_shards_by_rank_are_disjoint_and_cover(tmp_path):
    good, bad = make_image_folder(tmp_path, n_per_class=4)
    check.check_images(tmp_path / "train")
    shards = [_epoch(_loader(tmp_path, rank=r, world_size=3, drop_last=False)) for r in range(3)]
    assert sum(len(s) for s in shards) == len(good)
    assert sorted(sum(shards, [])) == good


def test_list_image_folder_labels(tmp_path):
    good, bad = make_image_folder(tmp_path)
    files, labels, classes = list_image_folder(tmp_path, "train")
    assert classes == ["c0", "c1"] and sorted(files) == sorted(good + bad)
    assert all(f"/c{lab}/" in f for f, lab in zip(files, labels))
    with pytest.raises(NotADirectoryError, match="root"):
        list_image_folder(tmp_path / "missing", "train")


def test_build_dali_loader_without_dali_says_how_to_install(monkeypatch, tmp_path):
    make_image_folder(tmp_path, bad=False)
    import builtins

    real_import = builtins.__import__

    def no_dali(name, *args, **kwargs):
        if name.startswith("nvidia.dali") or name == "nvidia":
            raise ImportError("No module named 'nvidia.dali'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dali)
    with pytest.raises(ImportError, match="pip install nvidia-dali-cuda130"):
        build_dali_loader(tmp_path, batch_size=2, device="cpu")

"""The image-folder dataset's robust decoding and the embedded shapes dataset."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from stellar.data import augment
from stellar.data.folder import ImageFolderDataset, decode_image
from stellar.data.shapes import KINDS, VERSION, default_root, ensure_shapes_dataset, mask_path, render_sample


def _rgb(rng, h, w):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture
def odd_folder(tmp_path):
    """A class-folder tree with every awkward kind of file; returns (root, expected arrays by name)."""
    rng = np.random.default_rng(0)
    expect = {}
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    rgb = _rgb(rng, 20, 30)
    Image.fromarray(rgb).save(a / "rgb.png")
    expect["rgb.png"] = rgb
    gray = rng.integers(0, 256, size=(17, 11), dtype=np.uint8)
    Image.fromarray(gray).save(a / "gray.png")
    expect["gray.png"] = np.repeat(gray[..., None], 3, 2)
    rgba = rng.integers(0, 256, size=(9, 14, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(a / "rgba.png")
    expect["rgba.png"] = rgba[..., :3]
    g16 = rng.integers(0, 65536, size=(12, 13), dtype=np.uint16)
    Image.fromarray(g16).save(b / "gray16.png")
    # the reference keeps the high byte of 16-bit samples (stellar.data.decode)
    expect["gray16.png"] = np.repeat((g16 >> 8).astype(np.uint8)[..., None], 3, 2)
    pal = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.save(b / "palette.png")
    expect["palette.png"] = np.asarray(pal.convert("RGB"))
    cmyk = Image.new("CMYK", (16, 10), (0, 255, 255, 0))  # pure red
    cmyk.save(b / "cmyk.jpg", quality=95)
    expect["cmyk.jpg"] = np.broadcast_to(np.array([255, 0, 0], np.uint8), (10, 16, 3))
    tiny = _rgb(rng, 2, 3)
    Image.fromarray(tiny).save(b / "tiny.png")
    expect["tiny.png"] = tiny
    # broken files
    good = io.BytesIO()
    Image.fromarray(_rgb(rng, 64, 64)).save(good, format="JPEG")
    (b / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (a / "garbage.jpg").write_bytes(rng.integers(0, 256, size=500, dtype=np.uint8).tobytes())
    (a / "notes.txt").write_text("not an image")
    return tmp_path, expect


def test_awkward_modes_decode_to_rgb_uint8(odd_folder):
    root, expect = odd_folder
    for name, want in expect.items():
        path = next(root.rglob(name))
        got = decode_image(path)
        assert got.dtype == torch.uint8 and got.shape == (3, *want.shape[:2]), name
        tol = 3 if name == "cmyk.jpg" else 0  # JPEG is lossy
        diff = (got.permute(1, 2, 0).int() - torch.from_numpy(np.array(want)).int()).abs().max()
        assert diff <= tol, (name, diff)


def test_corrupt_files_are_skipped_and_counted(odd_folder):
    root, _ = odd_folder
    ds = ImageFolderDataset(root)
    assert ds.classes == ["a", "b"]
    assert len(ds) == 9  # notes.txt is not an image
    names = [p.name for p in ds.paths]
    i_garbage = names.index("garbage.jpg")
    image, label = ds[i_garbage]
    # the next index stands in, deterministically
    nxt = ds[(i_garbage + 1) % len(ds)]
    assert torch.equal(image, nxt[0]) and label == nxt[1]
    assert ds.skipped == 1
    assert ds.verify() == sorted(str(root / p) for p in ("a/garbage.jpg", "b/truncated.jpg"))
    assert ds.skipped == 2
    labels = [ds[i][1] for i in range(len(ds))]
    assert set(labels) == {0, 1}
    assert ds.skipped == 2  # known bad files are not counted twice


def test_small_image_still_yields_crops(odd_folder):
    root, _ = odd_folder
    image = decode_image(root / "b" / "tiny.png")
    rows = augment.sample_multicrop_params([tuple(image.shape[1:])], torch.Generator().manual_seed(0), 2, 3)
    views = augment.apply_crops([image], rows["local"], 12, normalize=False)
    assert views.shape == (3, 3, 12, 12) and torch.isfinite(views).all()
    assert views.min() >= 0 and views.max() <= 1


def test_folder_without_classes_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(_rgb(rng, 8, 8)).save(tmp_path / f"{i}.jpg")
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 3 and ds.classes == [] and {ds[i][1] for i in range(3)} == {0}
    with pytest.raises(ValueError, match="root"):
        ImageFolderDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="split"):
        ImageFolderDataset(tmp_path, split="train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(empty)
    bad = tmp_path / "allbad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"nope")
    with pytest.raises(RuntimeError, match="none of"):
        ImageFolderDataset(bad)[0]


# ---------------------------------------------------------------------------------------------
# The embedded shapes dataset
# ---------------------------------------------------------------------------------------------


def test_shapes_layout_and_determinism(tmp_path):
    a = ensure_shapes_dataset(tmp_path / "a", n_train=24, n_val=8, size=64)
    b = ensure_shapes_dataset(tmp_path / "b", n_train=24, n_val=8, size=64)
    meta = json.loads((a / "meta.json").read_text())
    assert meta["classes"] == list(KINDS) and len(KINDS) >= 6
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for split, count in (("train", 24), ("val", 8)):
        ds = ImageFolderDataset(a, split=split)
        assert len(ds) == count and ds.classes == sorted(KINDS)
        for path, label in zip(ds.paths, ds.labels):
            image = decode_image(path)
            assert image.shape == (3, 64, 64)
            mask = np.asarray(Image.open(mask_path(path)))
            assert mask.shape == (64, 64)
            kind = KINDS.index(ds.classes[label])
            counts = np.bincount(mask.ravel(), minlength=len(KINDS) + 1)
            # the labelled kind is the largest shape: most pixels of the mask
            assert counts[kind + 1] > 0 and counts[1:].argmax() == kind, (path, counts)
            # grey images, light shapes over a darker background (colour is no cue to the label)
            pixels = image.permute(1, 2, 0).numpy().astype(np.float32)
            assert np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max() < 40, path
            luma = pixels.mean(axis=2)
            assert luma[mask == kind + 1].mean() > luma[mask == 0].mean() + 60, path
    # other splits and seeds give other images
    assert not np.array_equal(np.asarray(render_sample(0, "train", 0, 64)[0]), np.asarray(render_sample(0, "val", 0, 64)[0]))
    assert not np.array_equal(np.asarray(render_sample(0, "train", 0, 64)[0]), np.asarray(render_sample(1, "train", 0, 64)[0]))


def test_shapes_cached_and_checked(tmp_path, monkeypatch):
    root = ensure_shapes_dataset(tmp_path / "s", n_train=8, n_val=8, size=32)
    stamp = (root / "meta.json").stat().st_mtime_ns
    assert ensure_shapes_dataset(root, n_train=8, n_val=8, size=32) == root
    assert (root / "meta.json").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    with pytest.raises(ValueError, match="other parameters"):
        ensure_shapes_dataset(root, n_train=9, n_val=8, size=32)
    with pytest.raises(ValueError, match="n_train"):
        ensure_shapes_dataset(tmp_path / "t", n_train=0)
    monkeypatch.setenv("STELLAR_DATA", str(tmp_path / "cache"))
    assert default_root() == tmp_path / "cache" / VERSION


# ---------------------------------------------------------------------------------------------
# ViewSpec (one description of the views, from the config) and the per-sample draws
# ---------------------------------------------------------------------------------------------
from stellar.data.draws import crop_rows, draw_samples  # noqa: E402
from stellar.data.spec import ViewSpec  # noqa: E402


def test_view_spec_from_config_matches_the_model():
    from stellar.model import resolve_config
    from stellar.train.config import load_config

    cfg = load_config("tiny", ["model.masking={mask_ratio: 0.75, focal: block, focal_prob: 0.3}",
                               "data.color={hue: 0.05, blur_p: 0.1}", "data.dtype=bfloat16"])
    spec = ViewSpec.from_config(cfg)
    model = resolve_config(cfg["model"])
    assert spec.patch_size == model["patch_size"] == 8 and spec.global_size == 64 and spec.grid == 8
    assert (spec.mask_ratio, spec.focal, spec.focal_prob) == (0.75, "block", 0.3)
    assert spec.n_keep == int(64 * (1 - 0.75)) and spec.hue == 0.05 and spec.blur_p == 0.1
    assert spec.torch_dtype == torch.bfloat16 and spec.num_global == cfg["data"]["num_global"]
    assert ViewSpec.from_config({"data": {}, "model": {"masking": {"focal": "none"}}}).focal is None
    with pytest.raises(ValueError, match="data.color"):
        ViewSpec.from_config({"data": {"color": {"hues": 0.1}}, "model": {}})


@pytest.mark.parametrize("field,value,match", [
    ("global_size", 0, "global_size"), ("num_local", -1, "num_local"), ("global_scale", (0.5, 0.2), "global_scale"),
    ("ratio", (0, 1), "ratio"), ("jitter_p", 1.5, "jitter_p"), ("hue", 0.7, "hue"), ("focal", "ring", "focal"),
    ("mask_ratio", 1.0, "mask_ratio"), ("dtype", "float16", "dtype"), ("local_size", 100, "local_size"),
    ("mask_ratio", 0.999, "keeps no patch"),
])
def test_view_spec_names_the_bad_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        ViewSpec(**{field: value})


def test_draws_are_a_pure_function_of_seed_epoch_position():
    spec = ViewSpec(global_size=32, local_size=16, num_global=3, num_local=2, patch_size=8)
    a = draw_samples(spec, 7, 2, [5, 9, 0])
    b = draw_samples(spec, 7, 2, [0, 5])  # other batch mates, other order: the same per-sample draws
    assert torch.equal(a.uniforms[0], b.uniforms[1]) and torch.equal(a.keep[2], b.keep[0])
    for other in (draw_samples(spec, 8, 2, [5]), draw_samples(spec, 7, 3, [5]), draw_samples(spec, 7, 2, [6])):
        assert not torch.equal(other.uniforms[0], a.uniforms[0])
    assert a.keep.shape == (3, 3, spec.n_keep) and (a.keep.diff(dim=-1) > 0).all()
    assert len({tuple(k.tolist()) for k in a.keep.flatten(0, 1)}) == 9  # each view its own mask
    rows = crop_rows(spec, a, [(40, 50), (33, 21), (64, 64)])
    assert rows.shape == (3 * 6, 12) and rows[:3, 0].tolist() == [0, 1, 2]
    # rows depend on the image's size, not on its batch mates
    alone = crop_rows(spec, draw_samples(spec, 7, 2, [9]), [(33, 21)])
    B, G, Lc = 3, 3, 2
    assert torch.equal(alone[0, 1:], rows[1, 1:])
    assert torch.equal(alone[1:1 + G, 1:], rows[B + G:B + 2 * G, 1:])
    assert torch.equal(alone[1 + G:, 1:], rows[B + B * G + Lc:B + B * G + 2 * Lc, 1:])

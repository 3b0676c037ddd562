"""`stellar data check`: finds exactly the undecodable images of a folder and lists them."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stellar.data import check, decode


def _noise(rng, h, w, channels=3):
    shape = (h, w, channels) if channels > 1 else (h, w)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def make_image_folder(root, n_per_class=3, seed=0, bad=True):
    """An ImageFolder tree `root/train/<class>/*` of tiny images of every awkward kind.

    Per class: `n_per_class` RGB JPEGs of odd sizes; class `c0` also holds a PNG with alpha, a
    grayscale JPEG, a CMYK JPEG and a JPEG with padding after its end marker (all decodable).
    With `bad`, class `c1` holds a truncated JPEG, a truncated PNG, an empty file and a text file
    named .jpg. Returns (good paths, bad paths), absolute, sorted.
    """
    rng = np.random.default_rng(seed)
    root = Path(root) / "train"
    good, broken = [], []
    for c in range(2):
        d = root / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            p = d / f"rgb{i}.jpg"
            Image.fromarray(_noise(rng, 17 + 5 * i, 23 + 3 * i)).save(p, quality=90)
            good.append(p)
    d = root / "c0"
    Image.fromarray(_noise(rng, 19, 31, 4), "RGBA").save(d / "alpha.png")
    Image.fromarray(_noise(rng, 21, 13, 1), "L").save(d / "gray.jpg")
    Image.fromarray(_noise(rng, 15, 27, 4), "CMYK").save(d / "cmyk.jpg")
    Image.fromarray(_noise(rng, 16, 16)).save(d / "padded.jpg")
    with open(d / "padded.jpg", "ab") as f:
        f.write(b"\0" * 5000)  # some writers pad after the end marker: still a good image
    good += [d / "alpha.png", d / "gray.jpg", d / "cmyk.jpg", d / "padded.jpg"]
    if bad:
        d = root / "c1"
        Image.fromarray(_noise(rng, 40, 40)).save(d / "trunc.jpg")
        Image.fromarray(_noise(rng, 30, 30)).save(d / "trunc.png")
        for name in ("trunc.jpg", "trunc.png"):
            data = (d / name).read_bytes()
            (d / name).write_bytes(data[: len(data) * 2 // 3])
        (d / "empty.jpg").write_bytes(b"")
        (d / "page.jpg").write_text("<html>not an image</html>")
        broken += [d / "trunc.jpg", d / "trunc.png", d / "empty.jpg", d / "page.jpg"]
    return sorted(str(p.resolve()) for p in good), sorted(str(p.resolve()) for p in broken)


@pytest.mark.parametrize("full", [False, True])
def test_check_finds_exactly_the_bad_files(tmp_path, full):
    good, bad = make_image_folder(tmp_path)
    result = check.check_images(tmp_path, full=full, num_workers=2)
    assert result["total"] == len(good) + len(bad)
    assert result["bad"] == bad
    assert set(result["reasons"]) == set(bad)
    assert result["list_path"] == str(tmp_path / check.BAD_LIST_NAME)
    assert check.read_bad_list(result["list_path"]) == set(bad)


def test_check_list_at_a_given_path_and_relative_names(tmp_path):
    _, bad = make_image_folder(tmp_path / "data")
    out = tmp_path / "lists" / "bad.txt"
    result = check.check_images(tmp_path / "data", out=out)
    assert result["list_path"] == str(out)
    assert check.read_bad_list(out) == set(bad)  # outside the folder: absolute names
    inside = check.check_images(tmp_path / "data")
    lines = [ln for ln in Path(inside["list_path"]).read_text().splitlines() if not ln.startswith("#")]
    assert all(not ln.startswith("/") for ln in lines)  # inside the folder: relative names
    moved = tmp_path / "moved"
    (tmp_path / "data").rename(moved)
    assert check.read_bad_list(moved / check.BAD_LIST_NAME) == {p.replace(str(tmp_path / "data"), str(moved)) for p in bad}


def test_check_clean_folder_and_missing_list(tmp_path):
    good, bad = make_image_folder(tmp_path, bad=False)
    assert bad == []
    result = check.check_images(tmp_path)
    assert result["bad"] == [] and result["total"] == len(good)
    assert check.read_bad_list(tmp_path / "nowhere.txt") == set()


def test_check_rejects_a_missing_folder(tmp_path):
    with pytest.raises(NotADirectoryError, match="root"):
        check.check_images(tmp_path / "missing")


def test_torchvision_decode_gives_three_channels(tmp_path):
    good, _ = make_image_folder(tmp_path, bad=False)
    from torchvision.io import read_file

    for p in good:
        img = decode.decode_bytes_torchvision(read_file(p))
        ref = torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
        assert img.dtype == torch.uint8 and img.shape == ref.shape
        assert torch.equal(img, ref), p


def test_main_writes_the_list(tmp_path, capsys):
    _, bad = make_image_folder(tmp_path)
    assert check.main([str(tmp_path), "--workers", "1"]) == 0
    assert f"{len(bad)} bad" in capsys.readouterr().out
    assert check.read_bad_list(tmp_path / check.BAD_LIST_NAME) == set(bad)

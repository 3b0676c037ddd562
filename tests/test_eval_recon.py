"""Reconstruction metrics: hand-checked PSNR/SSIM, LPIPS and rFID from local random weights, no network."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from stellar.eval.recon import build_fid, build_lpips, evaluate_recon, psnr, render_recon_grid, ssim

pytest.importorskip("torchmetrics")
lpips = pytest.importorskip("lpips")
pytest.importorskip("torch_fidelity")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to download weights fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to download: {args[:1]}")

    import urllib.request

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(fe, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_psnr_and_ssim_hand_checked(gen):
    x = torch.rand(3, 3, 24, 20, generator=gen) * 0.9
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(3))
    # A uniform shift by s: MSE = s^2, PSNR = 10 log10(1 / s^2).
    torch.testing.assert_close(psnr(x + 0.1, x), torch.full((3,), 20.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(psnr(x - 0.05, x), torch.full((3,), 10 * math.log10(1 / 0.05**2)), atol=1e-4, rtol=0)
    # Two flat images a, b: only SSIM's luminance term is left, (2ab + C1) / (a^2 + b^2 + C1), C1 = 0.01^2.
    a, b = torch.full((1, 3, 16, 16), 0.5), torch.full((1, 3, 16, 16), 0.6)
    want = (2 * 0.5 * 0.6 + 1e-4) / (0.25 + 0.36 + 1e-4)
    torch.testing.assert_close(ssim(a, b), torch.tensor([want]), atol=1e-5, rtol=0)
    assert (ssim(x + 0.1, x) < 1).all()
    with pytest.raises(ValueError, match="pred and target"):
        psnr(x, x[:, :, :8])


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    """A randomly initialised torchvision AlexNet, saved as torchvision's file would be."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "alexnet-random.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """torch-fidelity's FID InceptionV3 with random weights (its constructor's download bypassed here only)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    mp = pytest.MonkeyPatch()
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    try:
        torch.manual_seed(1)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        mp.undo()
    path = tmp_path_factory.mktemp("w") / "inception-random.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def test_lpips_from_a_torchvision_file_or_a_whole_lpips_file(alexnet_file, tmp_path, gen):
    net = build_lpips(alexnet_file)
    x = torch.rand(2, 3, 32, 32, generator=gen)
    y = (x + 0.3 * torch.rand(2, 3, 32, 32, generator=gen)).clamp(0, 1)
    assert net(x, x, normalize=True).abs().max() == 0
    d = net(x, y, normalize=True).flatten()
    assert (d > 0).all()
    # The same numbers from a whole lpips.LPIPS state dict holding that trunk and the package's layers.
    torch.save(net.state_dict(), tmp_path / "lpips_full.pth")
    torch.testing.assert_close(build_lpips(tmp_path / "lpips_full.pth")(x, y, normalize=True).flatten(), d)
    with pytest.raises(FileNotFoundError, match="--lpips-weights"):
        build_lpips(tmp_path / "absent.pth")
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="--lpips-weights"):
        build_lpips(tmp_path / "bad.pth")


def test_fid_from_a_local_file(inception_file, tmp_path, gen):
    fid = build_fid(inception_file, features=64)
    a = (torch.rand(6, 3, 32, 32, generator=gen) * 255).to(torch.uint8)
    b = (torch.rand(6, 3, 32, 32, generator=gen) * 128).to(torch.uint8)
    fid.update(a, real=True)
    fid.update(a, real=False)
    same = float(fid.compute())
    fid.reset()
    fid.update(a, real=True)
    fid.update(b, real=False)
    other = float(fid.compute())
    assert abs(same) < 1e-3 * other and other > 0
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        build_fid(tmp_path / "absent.pth")
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="--inception-weights"):
        build_fid(tmp_path / "bad.pth", features=64)


class Autoencoder(torch.nn.Module):
    """encode: Z = the pixels of each 4x4 patch; decode: the image again, times ``gain``."""

    def __init__(self, gain=1.0, patch=4):
        super().__init__()
        self.gain, self.patch = gain, patch
        self.w = torch.nn.Parameter(torch.ones(()))

    def encode(self, x):
        B, C, H, W = x.shape
        p = self.patch
        Z = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(B, (H // p) * (W // p), C * p * p)
        return {"Z": Z}

    def decode(self, Z):
        B, N, _ = Z.shape
        side, p = math.isqrt(N), self.patch
        x = Z.view(B, side, side, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, side * p, side * p)
        return x * self.gain * self.w


def image_folder(root, n=6, size=40, seed=0):
    rng = np.random.default_rng(seed)
    (root / "val" / "a").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(root / "val" / "a" / f"{i}.png")
    from stellar.data.folder import ImageFolderDataset

    return ImageFolderDataset(root, split="val")


def test_evaluate_recon_end_to_end(tmp_path, alexnet_file, inception_file):
    data = image_folder(tmp_path / "data")
    res = evaluate_recon(Autoencoder(), data, 32, batch_size=4, lpips_weights=alexnet_file,
                         inception_weights=inception_file, fid_features=64, progress=False,
                         grid=tmp_path / "grid.png", grid_images=5)
    assert res["psnr"] == math.inf and res["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert res["lpips"] == 0 and abs(res["rfid"]) < 1e-2 and res["num_images"] == 6
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size == (4 + 5 * (96 + 4), 4 + 2 * 96 + 2 * 4)
    # Half as bright: the mean over images of 10 log10(1 / mean((x/2 - x)^2)), computed here from the files.
    res = evaluate_recon(Autoencoder(gain=0.5), data, 32, batch_size=4, lpips_weights=alexnet_file,
                         progress=False)
    from stellar.eval.knn import prepare_images

    x = prepare_images([data[i][0] for i in range(len(data))], 32).double()
    want = np.mean([10 * math.log10(1 / float(((xi / 2 - xi) ** 2).mean())) for xi in x])
    assert res["psnr"] == pytest.approx(want, abs=1e-3)
    assert res["lpips"] > 0 and res["rfid"] is None and res["ssim"] < 1

    class Tokens(Autoencoder):
        def decode(self, Z):
            return torch.zeros(Z.shape[0], Z.shape[1], 1024)

    with pytest.raises(ValueError, match="pixel head"):
        evaluate_recon(Tokens(), data, 32, progress=False)


def test_grid_puts_originals_above_reconstructions():
    a = torch.zeros(3, 3, 8, 8)
    b = torch.ones(3, 3, 8, 8)
    sheet = np.asarray(render_recon_grid(a, b, tile=10, per_row=2, gap=2))
    assert sheet.shape == (2 + 2 * (20 + 4), 2 + 2 * 12, 3)
    assert sheet[2 + 5, 2 + 5].tolist() == [0, 0, 0]            # first original
    assert sheet[2 + 12 + 5, 2 + 5].tolist() == [255, 255, 255]  # its reconstruction below
    assert sheet[2 + 24 + 12 + 5, 2 + 5].tolist() == [255, 255, 255]  # the third pair, second row of pairs

"""Reconstruction quality from Z (STELLAR.md sections 3 and 7): PSNR, SSIM, LPIPS, rFID, and a grid.

    res = evaluate_recon(model, dataset, image_size=224, lpips_weights="lpips_alex.pth",
                         inception_weights="pt_inception-2015-12-05.pth", grid="grid.png")

Each validation image (centre square crop, resized to ``image_size``, in [0, 1]) goes through
``model.encode`` -> Z -> ``model.decode`` (the pixel head), clamped to [0, 1]; then, against the
image:
- **PSNR** (dB, data range 1, per image, then the mean over images; identical images give inf)
  and **SSIM** (Gaussian window 11, sigma 1.5, per image, then the mean): ``torchmetrics``.
- **LPIPS** (``lpips`` package, AlexNet trunk by default, inputs mapped to [-1, 1]; per image,
  then the mean) when ``lpips_weights`` is given.
- **rFID** (``torchmetrics`` FID on torch-fidelity's InceptionV3, 2048-d pool features, the
  originals as the reference set, torch-fidelity's resize to 299 px) when ``inception_weights``
  is given.

Nothing is downloaded. The weight files are read from the local disk (``.safetensors`` or torch
files, with ``weights_only=True``); a missing file is an error naming the option.
- ``lpips_weights``: either a whole ``lpips.LPIPS(net=...)`` state dict (``net.slice*``,
  ``lin*``), or a torchvision AlexNet / VGG16 state dict (``features.*``; e.g. torchvision's
  ``alexnet-owt-7be5be79.pth``), combined with the calibrated linear layers that ship inside the
  ``lpips`` package (``lpips/weights/v0.1/alex.pth``).
- ``inception_weights``: torch-fidelity's FID InceptionV3 (``weights-inception-2015-12-05-
  6726825d.pth``, the TF FID network converted), the file ``FeatureExtractorInceptionV3`` reads.

Under torchrun every rank reconstructs its share of the images (every world_size-th); the sums
and the FID statistics are reduced over ranks; rank 0 alone gets the result.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from stellar.train import distributed

from .features import EvalImages, _autocast, resolve_device

LPIPS_NETS = ("alex", "vgg")


# --------------------------------------------------------------------------- metrics

def _tm_image():
    try:
        import torchmetrics.functional.image as tmi
    except ImportError as exc:
        raise ImportError("stellar eval recon needs torchmetrics: pip install 'stellar[eval]'") from exc
    return tmi


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR in dB, data range 1: pred, target Tensor[B, 3, H, W] in [0, 1] -> Tensor[B]."""
    _check_pair(pred, target)
    return _tm_image().peak_signal_noise_ratio(pred.float(), target.float(), data_range=1.0, reduction="none",
                                               dim=(1, 2, 3))


def ssim(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5, data range 1) -> Tensor[B]."""
    _check_pair(pred, target)
    return _tm_image().structural_similarity_index_measure(pred.float(), target.float(), data_range=1.0,
                                                           reduction="none")


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 3:
        raise ValueError(f"pred and target must both be Tensor[B,3,H,W], got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")


def build_lpips(path: str | os.PathLike, net: str = "alex", option: str = "--lpips-weights") -> torch.nn.Module:
    """An ``lpips.LPIPS`` module with its weights from the local file ``path`` (see the module docstring).

    Constructed with a randomly initialised trunk (``pnet_rand=True``: torchvision builds it with no
    weights) and without the package's linear layers (``pretrained=False``), so it reads nothing
    and downloads nothing; then every tensor is loaded from ``path``, strictly.
    """
    from stellar.model.weights import read_state_dict

    if net not in LPIPS_NETS:
        raise ValueError(f"lpips net must be one of {LPIPS_NETS}, got {net!r}")
    sd = dict(read_state_dict(path, option))
    try:
        import lpips
    except ImportError as exc:
        raise ImportError("LPIPS needs the lpips package: pip install 'stellar[eval]'") from exc
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(pretrained|weights).*", category=UserWarning)
        model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    own = model.state_dict()
    wanted = [k for k in own if k.startswith("net.") or (k.startswith("lin") and not k.startswith("lins."))]
    if any(k.startswith("features.") for k in sd):
        # A torchvision classifier: its conv layers are the trunk (net.sliceK.{i} <- features.{i}).
        trunk = {k: sd[f"features.{k.split('.', 2)[2]}"] for k in wanted
                 if k.startswith("net.") and f"features.{k.split('.', 2)[2]}" in sd}
        lins = read_state_dict(Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth",
                               "the lpips package's linear layers")
        sd = {**trunk, **lins}
    # lins.0.model.1.weight is another name of lin0.model.1.weight (the same tensor, saved twice).
    sd = {("lin" + k[len("lins."):] if k.startswith("lins.") else k): v for k, v in sd.items()}
    missing = [k for k in wanted if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad = [f"{k} {tuple(sd[k].shape)} (needs {tuple(own[k].shape)})" for k in wanted
           if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise ValueError(f"{option}: {path} is not an LPIPS-{net} (or torchvision {net}) state dict: missing "
                         f"{missing}, unexpected {unexpected}, shapes {bad}")
    model.load_state_dict({k: sd[k] for k in wanted}, strict=False)
    return model.eval().requires_grad_(False)


def build_fid(path: str | os.PathLike, features: int = 2048, option: str = "--inception-weights"):
    """A ``torchmetrics`` ``FrechetInceptionDistance`` on torch-fidelity's InceptionV3, weights from ``path``.

    The file is read here with ``weights_only=True`` (safetensors too) and handed to torch-fidelity
    as a temporary torch file of plain tensors, so its own loader never unpickles the user's file
    and never reaches for its download URL.
    """
    from stellar.model.weights import read_state_dict

    sd = dict(read_state_dict(path, option))
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as exc:
        raise ImportError("rFID needs torchmetrics and torch-fidelity: pip install 'stellar[eval]'") from exc
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "inception.pth"
        torch.save(sd, local)
        try:
            # antialias=False: torch-fidelity's own resize to 299 px (the TF FID network's), as its FID does.
            fid = FrechetInceptionDistance(feature=features, feature_extractor_weights_path=str(local),
                                           antialias=False, normalize=False)
        except RuntimeError as exc:
            raise ValueError(f"{option}: {path} does not fit torch-fidelity's FID InceptionV3: {exc}") from exc
    return fid


def to_uint8(images: Tensor) -> Tensor:
    """[0,1] float images -> uint8 (rounded), the input of the FID network."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


# --------------------------------------------------------------------------- the evaluation

@torch.no_grad()
def reconstruct(model: torch.nn.Module, images: Tensor) -> Tensor:
    """images Tensor[B,3,S,S] in [0,1] -> model.decode(model.encode(images)["Z"]) clamped to [0,1], float32."""
    out = model.decode(model.encode(images)["Z"])
    if out.shape != images.shape:
        raise ValueError(f"eval recon needs the pixel head (model.decoder.head: pixels): decode gave "
                         f"{tuple(out.shape)} for images {tuple(images.shape)} (the token head's codes "
                         f"would need the VQGAN decoder, which this package does not have)")
    return out.float().clamp(0, 1)


@torch.no_grad()
def evaluate_recon(model: torch.nn.Module, dataset, image_size: int, batch_size: int = 64,
                   device: str | torch.device = "cpu", lpips_weights: str | os.PathLike | None = None,
                   inception_weights: str | os.PathLike | None = None, lpips_net: str = "alex",
                   fid_features: int = 2048, num_workers: int = 0, amp: str = "auto", progress: bool = True,
                   grid: str | os.PathLike | None = None, grid_images: int = 8) -> dict | None:
    """PSNR and SSIM (always), LPIPS and rFID (with their weights) of ``dataset``'s reconstructions.

    ``dataset[i] -> (image Tensor[3,H,W], label)``. Returns ``{"psnr", "ssim", "lpips", "rfid",
    "num_images", "image_size", "lpips_net", "fid_features", "grid"}`` (None for a metric without
    weights; None in place of the dict on ranks other than 0).
    """
    from tqdm import tqdm

    device = resolve_device(device)
    rank, world = distributed.rank(), distributed.world_size()
    # Build every metric first: a wrong weight file fails before any image is encoded.
    lp = build_lpips(lpips_weights, lpips_net).to(device) if lpips_weights is not None else None
    fid = build_fid(inception_weights, fid_features).to(device) if inception_weights is not None else None
    _tm_image()
    indices = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(EvalImages(dataset, image_size, indices), batch_size=batch_size,
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)             # psnr, ssim, lpips, count
    psnr_inf = False
    bar = tqdm(total=len(indices), desc="reconstructions", unit="img", disable=not (progress and rank == 0),
               dynamic_ncols=True)
    try:
        for images, _, _ in loader:
            x = images.to(device, non_blocking=True)
            with _autocast(device, amp):
                y = reconstruct(model, x)
            p = psnr(y, x)
            psnr_inf |= bool(torch.isinf(p).any())
            sums[0] += p[torch.isfinite(p)].double().sum().cpu()
            sums[1] += ssim(y, x).double().sum().cpu()
            if lp is not None:
                sums[2] += lp(y, x, normalize=True).double().sum().cpu()
            sums[3] += x.shape[0]
            if fid is not None:
                fid.update(to_uint8(x), real=True)
                fid.update(to_uint8(y), real=False)
            bar.update(x.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    flag = torch.tensor([float(psnr_inf)], dtype=torch.float64)
    if world > 1:
        both = torch.cat([sums, flag]).to(device)
        torch.distributed.all_reduce(both)
        sums, flag = both[:4].cpu(), both[4:].cpu()
    rfid = float(fid.compute()) if fid is not None else None     # syncs the statistics over ranks
    if rank != 0:
        return None
    n = int(sums[3])
    if n == 0:
        raise ValueError("the dataset is empty")
    # A perfect reconstruction has PSNR inf; the mean over images is then inf as well.
    mean_psnr = float("inf") if flag.item() > 0 else float(sums[0] / n)
    res = {"psnr": mean_psnr, "ssim": float(sums[1] / n), "lpips": float(sums[2] / n) if lp is not None else None,
           "rfid": rfid, "num_images": n, "image_size": int(image_size),
           "lpips_net": lpips_net if lp is not None else None, "fid_features": fid_features if fid is not None else None,
           "grid": None}
    if grid is not None:
        images = torch.stack([EvalImages(dataset, image_size)[i][0] for i in range(min(grid_images, len(dataset)))])
        res["grid"] = str(save_recon_grid(model, images, grid, device=device, amp=amp))
    return res


def render_recon_grid(originals: Tensor, recons: Tensor, tile: int = 96, per_row: int = 8, gap: int = 4):
    """originals, recons Tensor[B,3,H,W] in [0,1] -> PIL image: rows of originals, each above its reconstructions."""
    from PIL import Image

    import torch.nn.functional as F

    _check_pair(recons, originals)
    B = originals.shape[0]
    cols = min(per_row, B)
    groups = -(-B // per_row)
    sheet = Image.new("RGB", (gap + cols * (tile + gap), gap + groups * (2 * tile + 2 * gap)), (255, 255, 255))

    def pil(img):
        t = F.interpolate(img[None].float().cpu().clamp(0, 1), size=(tile, tile), mode="bilinear",
                          align_corners=False, antialias=True)[0]
        return Image.fromarray((t.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())

    for b in range(B):
        g, c = divmod(b, per_row)
        x, y = gap + c * (tile + gap), gap + g * (2 * tile + 2 * gap)
        sheet.paste(pil(originals[b]), (x, y))
        sheet.paste(pil(recons[b]), (x, y + tile + gap))
    return sheet


@torch.no_grad()
def save_recon_grid(model: torch.nn.Module, images: Tensor, path: str | os.PathLike, tile: int = 96,
                    device: str | torch.device | None = None, amp: str = "auto") -> Path:
    """Reconstruct ``images: Tensor[B,3,S,S]`` in [0,1] and write the grid (originals above reconstructions) as a PNG."""
    device = next(model.parameters()).device if device is None else resolve_device(device)
    was_training = model.training
    model.eval()
    try:
        with _autocast(device, amp):
            recons = reconstruct(model, images.to(device))
    finally:
        model.train(was_training)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_recon_grid(images.cpu(), recons.cpu(), tile=tile).save(path, format="PNG")
    return path

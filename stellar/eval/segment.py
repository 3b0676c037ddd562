"""Linear segmentation probe on frozen patch features: Z (the low-rank map) and, for comparison,
the dense encoder outputs.

    res = evaluate_segmentation(model, masked_images(root, "train"), masked_images(root, "val"), 64)
    res["Z"]["miou"], res["dense"]["miou"]

For each feature kind, a probe ``LayerNorm(D) -> Linear(D, K)`` is applied to every patch; its
logits [K, h, w] are upsampled bilinearly to the image's pixels and trained with pixel-wise
cross-entropy against the mask (``ignore_index`` pixels left out) with AdamW and a cosine
schedule. The encoder is frozen: its features are computed once (stored in float16) and reused
every epoch. On the validation split the argmax class of each pixel is compared with the mask:
one confusion matrix over all pixels of all images, IoU per class = TP / (TP + FP + FN), mIoU =
the mean over the classes present in the masks or the predictions.

Classes: the mask values. For the embedded shapes set, 0 = background and k + 1 = shape kind k
(9 classes); for other data, ``num_classes`` (default: the largest value in the training masks
+ 1, 255 ignored). Runs in one process.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .features import _autocast, resolve_device
from .localize import IGNORE, MaskedImages

FEATURES = ("Z", "dense")


@torch.no_grad()
def patch_features(model: torch.nn.Module, data: MaskedImages, image_size: int, kinds=FEATURES,
                   batch_size: int = 64, device: str | torch.device = "cpu", amp: str = "auto",
                   num_workers: int = 0) -> tuple[dict[str, Tensor], Tensor, tuple[int, int]]:
    """({kind: HalfTensor[M, N, D]}, masks LongTensor[M, S, S], (h, w) patch grid) of every image."""
    device = resolve_device(device)
    loader = torch.utils.data.DataLoader(data.at(image_size), batch_size=batch_size, num_workers=num_workers)
    was_training = model.training
    model.eval()
    feats: dict[str, list[Tensor]] = {k: [] for k in kinds}
    masks = []
    try:
        for x, m in loader:
            x = x.to(device)
            with _autocast(device, amp):
                out = model.encode(x)
            for k in kinds:
                feats[k].append(out[k].to(torch.float16).cpu())                 # B x N x D
            masks.append(m)
        grid = model.encoder.grid(x) if hasattr(model, "encoder") else None
    finally:
        model.train(was_training)
    feats = {k: torch.cat(v) for k, v in feats.items()}
    if grid is None:
        side = math.isqrt(next(iter(feats.values())).shape[1])
        grid = (side, side)
    return feats, torch.cat(masks), grid


class SegmentationProbe(nn.Module):
    """forward(features Tensor[B, N, D], grid (h, w), size S) -> logits Tensor[B, K, S, S]."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, features: Tensor, grid: tuple[int, int], size: int) -> Tensor:
        B, N, _ = features.shape
        logits = self.linear(self.norm(features.float()))                             # B x N x K
        logits = logits.transpose(1, 2).reshape(B, -1, *grid)                          # B x K x h x w
        return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


def train_probe(features: Tensor, masks: Tensor, grid: tuple[int, int], num_classes: int, epochs: int = 10,
                lr: float = 1e-3, batch_size: int = 64, ignore_index: int = IGNORE, seed: int = 0,
                device: str | torch.device = "cpu") -> SegmentationProbe:
    """A probe trained on ``features: Tensor[M, N, D]`` against ``masks: LongTensor[M, S, S]``."""
    if features.dim() != 3 or masks.dim() != 3 or features.shape[0] != masks.shape[0]:
        raise ValueError(f"features must be [M,N,D] and masks [M,S,S], got {tuple(features.shape)} and "
                         f"{tuple(masks.shape)}")
    device = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = SegmentationProbe(features.shape[2], num_classes).to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * -(-features.shape[0] // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    size = masks.shape[-1]
    for _ in range(epochs):
        order = torch.randperm(features.shape[0], generator=gen)
        for start in range(0, features.shape[0], batch_size):
            idx = order[start:start + batch_size]
            logits = probe(features[idx].to(device), grid, size)
            loss = F.cross_entropy(logits, masks[idx].to(device), ignore_index=ignore_index)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return probe.eval()


def confusion(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE) -> Tensor:
    """pred, target LongTensor[...] -> LongTensor[K, K], row = true class, column = predicted."""
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    idx = target[keep] * num_classes + pred[keep]
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def miou(conf: Tensor) -> tuple[float, list[float | None]]:
    """(mean IoU over classes with any pixel in target or prediction, per-class IoU or None)."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    per = [float(t / u) if u > 0 else None for t, u in zip(tp, union)]
    present = [p for p in per if p is not None]
    return (sum(present) / len(present) if present else float("nan")), per


@torch.no_grad()
def probe_miou(probe: SegmentationProbe, features: Tensor, masks: Tensor, grid: tuple[int, int], num_classes: int,
               batch_size: int = 64, ignore_index: int = IGNORE) -> tuple[float, list[float | None]]:
    device = next(probe.parameters()).device
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for start in range(0, features.shape[0], batch_size):
        logits = probe(features[start:start + batch_size].to(device), grid, masks.shape[-1])
        conf += confusion(logits.argmax(1).cpu(), masks[start:start + batch_size], num_classes, ignore_index)
    return miou(conf)


def evaluate_segmentation(model: torch.nn.Module, train: MaskedImages, val: MaskedImages, image_size: int,
                          epochs: int = 10, lr: float = 1e-3, batch_size: int = 64,
                          num_classes: int | None = None, device: str | torch.device = "cpu", amp: str = "auto",
                          ignore_index: int = IGNORE, kinds=FEATURES, num_workers: int = 0) -> dict:
    """Linear probes on frozen ``kinds`` (Z and dense), trained on ``train``, mIoU on ``val``.

    Returns ``{kind: {"miou", "per_class", "train_miou"}, "num_classes", "epochs", "num_train",
    "num_val", "image_size", "classes"}``.
    """
    train_x, train_m, grid = patch_features(model, train, image_size, kinds, batch_size, device, amp, num_workers)
    val_x, val_m, _ = patch_features(model, val, image_size, kinds, batch_size, device, amp, num_workers)
    if num_classes is None and train.classes:
        num_classes = len(train.classes) + 1
    if num_classes is None:
        valid = train_m[train_m != ignore_index]
        num_classes = int(valid.max()) + 1 if valid.numel() else 1
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background and one class), got {num_classes}")
    res: dict = {"num_classes": num_classes, "epochs": epochs, "num_train": len(train_m), "num_val": len(val_m),
                 "image_size": int(image_size),
                 "classes": ["background", *train.classes] if train.classes else None}
    for kind in kinds:
        probe = train_probe(train_x[kind], train_m, grid, num_classes, epochs, lr, batch_size, ignore_index,
                            device=device)
        val_miou, per = probe_miou(probe, val_x[kind], val_m, grid, num_classes, batch_size, ignore_index)
        train_miou, _ = probe_miou(probe, train_x[kind], train_m, grid, num_classes, batch_size, ignore_index)
        res[kind] = {"miou": val_miou, "per_class": per, "train_miou": train_miou}
    return res

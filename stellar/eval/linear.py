"""Linear probe (STELLAR.md section 7): frozen encoder, mean sparse token, LayerNorm, Linear.

The encoder is frozen, so its features are computed once (``extract_features``) and the probe
is trained on them with AdamW (lr 1e-3) and a cosine schedule.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from .knn import split_features


class LinearProbe(nn.Module):
    """LayerNorm(D) -> Linear(D, classes). forward(features: Tensor[B, D]) -> logits Tensor[B, classes]."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(self.norm(features))


def train_linear_probe(train_features: Tensor, train_labels: Tensor, num_classes: int, epochs: int = 30,
                       lr: float = 1e-3, batch_size: int = 2048, weight_decay: float = 0.0,
                       seed: int = 0, device: str | torch.device = "cpu") -> LinearProbe:
    """A probe trained on ``train_features: Tensor[M, D]`` and ``train_labels: LongTensor[M]``
    (on ``device``: the features are moved there once)."""
    if train_features.dim() != 2 or train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"train_features must be [M,D] and train_labels [M], got {tuple(train_features.shape)} "
                         f"and {tuple(train_labels.shape)}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LinearProbe(train_features.shape[1], num_classes).to(device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-train_features.shape[0] // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch))
    x, y = train_features.float().to(device), train_labels.long().to(device)
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start:start + batch_size].to(device)
            loss = nn.functional.cross_entropy(probe(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return probe.eval()


@torch.no_grad()
def probe_accuracy(probe: LinearProbe, features: Tensor, labels: Tensor) -> float:
    device = next(probe.parameters()).device
    return (probe(features.float().to(device)).argmax(dim=1) == labels.long().to(device)).float().mean().item()


def evaluate_linear(model: torch.nn.Module, root: str | os.PathLike | None = None, image_size: int = 64,
                    epochs: int = 30, lr: float = 1e-3, batch_size: int = 2048, feature_batch_size: int = 256,
                    device: str | torch.device = "cpu", **extract_kwargs) -> dict | None:
    """Linear-probe accuracy on the val split after training on the train split's frozen features.

    ``extract_kwargs``: cache_dir, checkpoint, num_workers, amp, progress (``knn.split_features``).
    None on ranks other than 0 under torchrun (the probe trains on rank 0).
    """
    from .features import resolve_device

    if root is None:
        from stellar.data.shapes import ensure_shapes_dataset

        root = ensure_shapes_dataset()
    device = resolve_device(device)
    train_x, train_y = split_features(model, root, "train", image_size, feature_batch_size, device, **extract_kwargs)
    val_x, val_y = split_features(model, root, "val", image_size, feature_batch_size, device, **extract_kwargs)
    if train_x is None:
        return None
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    probe = train_linear_probe(train_x, train_y, num_classes, epochs, lr, batch_size, device=device)
    return {"accuracy": probe_accuracy(probe, val_x, val_y), "train_accuracy": probe_accuracy(probe, train_x, train_y),
            "epochs": epochs, "num_train": len(train_y), "num_val": len(val_y), "num_classes": num_classes}

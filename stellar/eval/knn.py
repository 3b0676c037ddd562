"""kNN evaluation on the mean sparse token (STELLAR.md section 7), DINO-style weighted votes.

    acc = knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=20, temperature=0.07)

For each test feature, the k training features with the highest cosine similarity s_i vote
for their class with weight exp(s_i / temperature); the prediction is the class with the
largest summed weight.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor


def knn_predict(train_features: Tensor, train_labels: Tensor, test_features: Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int | None = None) -> Tensor:
    """Class scores of each test feature.

    train_features: Tensor[M, D]; train_labels: LongTensor[M] in [0, num_classes);
    test_features: Tensor[T, D] -> scores Tensor[T, num_classes] (sum of exp(cos / temperature)
    over the k nearest training features of each class). Features need not be normalized.
    ``chunk``: test rows per similarity block (default: a block of at most 2**28 similarities, 1 GiB).
    """
    if train_features.dim() != 2 or test_features.dim() != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train_features [M,D] and test_features [T,D] must share D, got "
                         f"{tuple(train_features.shape)} and {tuple(test_features.shape)}")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"train_labels must have shape [{train_features.shape[0]}], got {tuple(train_labels.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, train_features.shape[0])
    if chunk is None:
        chunk = max(1, min(1024, 2**28 // max(1, train_features.shape[0])))
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    labels = train_labels.long()
    scores = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start:start + chunk] @ train.T                              # t x M
        top_sim, top_idx = sim.topk(k, dim=1)                                  # t x k
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, labels[top_idx], weights)                        # t x classes
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def knn_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None) -> float:
    """Top-1 accuracy in [0, 1] of ``knn_predict`` against ``test_labels: LongTensor[T]``."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    return (scores.argmax(dim=1) == test_labels.long()).float().mean().item()


# --------------------------------------------------------------------------- features of a model

def load_split(root: str | os.PathLike, split: str, limit: int | None = None):
    """The images of ``root/split`` as an ImageFolder dataset: ``ds[i] -> (uint8 Tensor[3,H,W], label)``."""
    from stellar.data.folder import ImageFolderDataset

    ds = ImageFolderDataset(root, split=split)
    if limit is not None and limit < len(ds):
        # An evenly spaced subset keeps every class represented.
        ds = torch.utils.data.Subset(ds, torch.linspace(0, len(ds) - 1, limit).long().tolist())
    return ds


def prepare_images(images: Iterable[Tensor], size: int) -> Tensor:
    """uint8 or [0,1] float images Tensor[3,H,W] -> Tensor[B,3,size,size] in [0,1].

    Centre square crop, then bilinear resize with antialias (no augmentation).
    """
    out = []
    for img in images:
        x = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
        if x.dim() != 3 or x.shape[0] not in (1, 3):
            raise ValueError(f"images must be Tensor[3,H,W] (or [1,H,W]), got {tuple(x.shape)}")
        x = x.expand(3, -1, -1)
        h, w = x.shape[-2:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[:, top:top + side, left:left + side]
        if side != size:
            x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        out.append(x.clamp(0, 1))
    return torch.stack(out)


def extract_features(model: torch.nn.Module, dataset, image_size: int, batch_size: int = 256,
                     device: str | torch.device = "cpu", **kwargs) -> tuple[Tensor, Tensor]:
    """The mean sparse token of every image: (features Tensor[M, D], labels LongTensor[M]).

    ``dataset[i] -> (image Tensor[3,H,W], label)``; ``model.encode`` gives ``sparse [B,r,D]``.
    ``kwargs`` go to ``stellar.eval.features.extract`` (cache, num_workers, progress, amp...).
    Under torchrun, ranks other than 0 get ``(None, None)``.
    """
    from .features import extract

    kwargs.setdefault("progress", False)
    feats = extract(model, dataset, ("pooled",), image_size, batch_size, device, **kwargs)
    if feats is None:
        return None, None
    return feats["pooled"], feats["label"]


def split_features(model: torch.nn.Module, root: str | os.PathLike, split: str, image_size: int,
                   batch_size: int = 256, device: str | torch.device = "cpu", limit: int | None = None,
                   cache_dir: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
                   num_workers: int = 0, amp: str = "auto", progress: bool = False) -> tuple[Tensor, Tensor]:
    """``extract_features`` of ``root/split``, through the on-disk cache when ``cache_dir`` is given."""
    from .features import FeatureCache

    ds = load_split(root, split, limit)
    cache = None
    if cache_dir is not None:
        settings = {"kinds": ["pooled"], "image_size": int(image_size), "amp": amp, "dtype": "float32",
                    "split": split}
        cache = FeatureCache.for_model(cache_dir, model, ds, settings, checkpoint)
    return extract_features(model, ds, image_size, batch_size, device, cache=cache, num_workers=num_workers,
                            amp=amp, progress=f"{split} features" if progress else False)


def evaluate_knn(model: torch.nn.Module, root: str | os.PathLike | None = None, image_size: int = 64,
                 k: int = 20, temperature: float = 0.07, batch_size: int = 256,
                 device: str | torch.device = "cpu", max_train: int | None = None,
                 max_val: int | None = None, **extract_kwargs) -> dict | None:
    """kNN accuracy of ``model`` with the train split as memory and the val split as queries.

    ``root`` is an ImageFolder root with train/ and val/ (default: the embedded shapes set).
    ``extract_kwargs``: cache_dir, checkpoint, num_workers, amp, progress (``split_features``).
    Returns ``{"accuracy", "k", "temperature", "num_train", "num_val", "num_classes"}`` (None on
    ranks other than 0 under torchrun).
    """
    if root is None:
        from stellar.data.shapes import ensure_shapes_dataset

        root = ensure_shapes_dataset()
    from .features import resolve_device

    root, device = Path(root), resolve_device(device)
    train_x, train_y = split_features(model, root, "train", image_size, batch_size, device, max_train, **extract_kwargs)
    val_x, val_y = split_features(model, root, "val", image_size, batch_size, device, max_val, **extract_kwargs)
    if train_x is None:
        return None
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    acc = knn_accuracy(train_x.to(device), train_y.to(device), val_x.to(device), val_y.to(device), k, temperature,
                       num_classes)
    return {"accuracy": acc, "k": k, "temperature": temperature, "num_train": len(train_y),
            "num_val": len(val_y), "num_classes": num_classes}

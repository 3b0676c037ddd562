"""Synthetic training batches with the loader protocol the trainer uses, for tests and benchmarks.

    pretrain(cfg, "runs/x", loader_fn=SyntheticLoader)       # loader_fn(cfg, rank, world_size)

Global batch k of the run (k = epoch * batches_per_epoch + batch) is a pure function of
(seed, k): ``image [B,3,S,S]``, ``global_views [B,G,3,S,S]``, ``local_views [B,Lc,3,s,s]``
uniform in [0, 1] at the config's view sizes, the masked views' kept patches ``keep
[B,G,n_keep]`` drawn with ``model.masking`` (or none, ``keep=False``: the model draws them) and
``label [B]``, with B the global batch. Rank r of W takes rows [r*b, (r+1)*b), so W processes
with ``train.batch_size`` b see what one process with W*b sees. ``state_dict()`` is {"epoch",
"batch"} (global batches of the epoch handed out); a loader resumed at the end of an epoch starts
the next one, and every pass ends by moving to the next epoch, as the stellar.data loaders do.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import torch
from torch import Tensor

__all__ = ["SyntheticLoader"]


class SyntheticLoader:
    """Rank ``rank`` of ``world_size``'s slice of synthetic global batches (module docstring).

    cfg: a merged run config (``data`` view sizes and counts, ``model`` patch size and masking,
    ``train.batch_size`` per process, ``seed``). device: where the batches are made (default: the
    CPU). labels: how many classes ``label`` draws from.
    """

    def __init__(self, cfg: Mapping, rank: int = 0, world_size: int = 1, *, batches_per_epoch: int = 3,
                 keep: bool = True, device: torch.device | str | None = None, labels: int = 4) -> None:
        from stellar.model.stellar import resolve_config

        model, data = resolve_config(cfg["model"]), cfg["data"]
        self.rank, self.world, self.b = rank, world_size, int(cfg["train"]["batch_size"])
        self.seed, self.batches_per_epoch = int(cfg["seed"]), int(batches_per_epoch)
        self.S, self.s, self.G, self.Lc = data["global_size"], data["local_size"], data["num_global"], data["num_local"]
        self.grid = data["global_size"] // model["patch_size"]
        self.masking = model["masking"] if keep else None
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.labels = labels
        self.epoch, self.batch = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: Mapping) -> None:
        self.epoch, self.batch = state["epoch"], state["batch"]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batch = epoch, 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def global_batch(self, k: int) -> dict[str, Tensor]:
        """Global batch ``k`` of the run, all W*b rows, on ``device``."""
        from stellar.model.masking import sample_keep_indices

        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + k)
        B, dev = self.b * self.world, self.device
        out = {"image": torch.rand(B, 3, self.S, self.S, generator=g, device=dev),
               "global_views": torch.rand(B, self.G, 3, self.S, self.S, generator=g, device=dev),
               "local_views": torch.rand(B, self.Lc, 3, self.s, self.s, generator=g, device=dev)}
        if self.masking is not None and self.G:
            m = self.masking
            keep = sample_keep_indices(B * self.G, self.grid, self.grid, m["mask_ratio"], m["focal"],
                                       m["focal_prob"], generator=g)
            out["keep"] = keep.view(B, self.G, -1)
        out["label"] = torch.randint(0, self.labels, (B,), generator=g, device=dev)
        return out

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        if self.batch >= self.batches_per_epoch:          # resumed at the very end of an epoch
            self.epoch, self.batch = self.epoch + 1, 0
        epoch = self.epoch
        rows = slice(self.rank * self.b, (self.rank + 1) * self.b)
        while self.batch < self.batches_per_epoch:
            full = self.global_batch(epoch * self.batches_per_epoch + self.batch)
            self.batch += 1
            yield {k: v[rows] for k, v in full.items()}
        self.epoch, self.batch = epoch + 1, 0

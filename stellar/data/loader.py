"""Multi-crop batch loaders: `build_loader` picks a backend; the reference one lives here.

The reference backend decodes and augments on the CPU in DataLoader workers (PIL decode, then
`augment.apply_crops`). Batches are dicts (docs/design.md):

    image         Tensor[B, 3, S, S]      float32 in [0, 1], no colour augmentation
    global_views  Tensor[B, G, 3, S, S]   view 0 is the `image` crop plus colour augmentation
    local_views   Tensor[B, Lc, 3, s, s]
    label         LongTensor[B]

Every random choice is a pure function of (seed, epoch, sample index) (the shuffle of an epoch
of (seed, epoch)), so a run resumed from `state_dict()` ({epoch, batch}) sees exactly the
batches the uninterrupted run would have seen, whatever the number of workers.
"""
import hashlib
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

from . import augment
from .folder import IMAGE_EXTS, ImageFolderDataset
from .dali import resolve_shard

BACKENDS = ("auto", "reference", "torchvision", "dali")


def stream_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (e.g. seed, epoch, index); stable across processes."""
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def pick_backend() -> str:
    """'dali' where nvidia.dali imports and CUDA is available, 'torchvision' with CUDA, else 'reference'."""
    if not torch.cuda.is_available():
        return "reference"
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # noqa: BLE001  any failure to import means no DALI
        return "torchvision"
    return "dali"


def resolve_root(root: Optional[Union[str, Path]], split: Optional[str]) -> Path:
    """The folder to read: `root/split` when it exists, else `root` (a folder without splits).

    root None means the embedded shapes dataset (generated on first use).
    """
    if root is None:
        from .shapes import ensure_shapes_dataset

        root = ensure_shapes_dataset()
    root = Path(root).expanduser()
    if split and (root / split).is_dir():
        return root / split
    return root


class _MultiCropSamples(Dataset):
    """Maps a key (epoch, index) to one sample's views, decoded and augmented (in a worker)."""

    def __init__(self, images: ImageFolderDataset, seed: int, global_size: int, local_size: int, crop_kwargs: dict):
        self.images = images
        self.seed = seed
        self.global_size = global_size
        self.local_size = local_size
        self.crop_kwargs = crop_kwargs

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        epoch, index = key
        image, label, bad = self.images.load(index)
        gen = torch.Generator().manual_seed(stream_seed(self.seed, epoch, index))
        rows = augment.sample_multicrop_params([tuple(image.shape[1:])], gen, **self.crop_kwargs)
        big = augment.apply_crops([image], torch.cat([rows["image"], rows["global"]]), self.global_size, normalize=False)
        return {
            "image": big[0],
            "global_views": big[1:],
            "local_views": augment.apply_crops([image], rows["local"], self.local_size, normalize=False),
            "label": label,
            "bad": bad,
        }


def _collate(samples):
    """Stack samples into the batch dict; returns (batch, bad paths met while loading it)."""
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "global_views": torch.stack([s["global_views"] for s in samples]),
        "local_views": torch.stack([s["local_views"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
    }
    bad = sorted({p for s in samples for p in s["bad"]})
    return batch, bad


class ReferenceLoader:
    """CPU multi-crop loader with exact mid-epoch resume.

    Iterating yields the batches of the current epoch from the current position; a finished
    pass moves to the next epoch. `state_dict()` -> {"epoch", "batch"} counts the batches
    already handed out; `load_state_dict` restores it. `set_epoch(e)` jumps to the start of
    epoch e (a call with the current epoch keeps the position, so a resumed run may call it).
    `skipped` / `bad_paths`: undecodable files met so far, gathered from all workers.
    """

    def __init__(
        self,
        dataset: ImageFolderDataset,
        batch_size: int,
        num_workers: int = 2,
        global_size: int = 224,
        local_size: int = 96,
        num_global: int = 8,
        num_local: int = 8,
        global_scale: Sequence[float] = (0.36, 1.0),
        local_scale: Sequence[float] = (0.06, 0.36),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        pin_memory: bool = False,
    ):
        for name, v, lo in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0), ("global_size", global_size, 1),
                            ("local_size", local_size, 1), ("num_global", num_global, 0), ("num_local", num_local, 0),
                            ("world_size", world_size, 1), ("rank", rank, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.pin_memory = pin_memory
        crop_kwargs = dict(num_global=num_global, num_local=num_local, global_scale=tuple(global_scale),
                           local_scale=tuple(local_scale), ratio=tuple(ratio))
        # draw once here so that bad scale/ratio values fail now, not in a worker
        augment.sample_multicrop_params([(8, 8)], torch.Generator().manual_seed(0), **crop_kwargs)
        self._samples = _MultiCropSamples(dataset, self.seed, global_size, local_size, crop_kwargs)
        self.epoch = 0
        self.batch = 0
        self._bad = set()
        if len(self) == 0:
            raise ValueError(
                f"batch_size {batch_size} with drop_last leaves no batch: {len(dataset)} images over {world_size} rank(s)"
            )

    # -- size and order ------------------------------------------------------------------------
    def _per_rank(self) -> int:
        n = len(self.dataset)
        return n // self.world_size if self.drop_last else math.ceil(n / self.world_size)

    def __len__(self) -> int:
        per_rank = self._per_rank()
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def indices(self, epoch: int) -> list:
        """This rank's sample indices for `epoch`, in order (a pure function of seed, epoch)."""
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed(self.seed, epoch, -1)))
        else:
            order = torch.arange(n)
        total = self._per_rank() * self.world_size
        if total > n:  # pad by wrapping around, as DistributedSampler does
            order = torch.cat([order, order[: total - n]])
        return order[:total][self.rank :: self.world_size].tolist()

    def batches(self, epoch: int) -> list:
        """This rank's batches of `epoch`: lists of (epoch, index) keys."""
        idx = self.indices(epoch)
        return [[(epoch, i) for i in idx[b * self.batch_size : (b + 1) * self.batch_size]] for b in range(len(self))]

    # -- position ------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch, self.batch = int(epoch), 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or batch < 0:
            raise ValueError(f"state must hold non-negative epoch and batch, got {state}")
        self.epoch, self.batch = epoch, batch

    @property
    def bad_paths(self) -> list:
        return sorted(self._bad)

    @property
    def skipped(self) -> int:
        return len(self._bad)

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self):
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0
        epoch = self.epoch
        todo = self.batches(epoch)[self.batch :]
        loader = DataLoader(
            self._samples,
            batch_sampler=todo,
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.pin_memory,
            # DataLoader draws its workers' base seed from this generator: leave the global RNG alone
            generator=torch.Generator().manual_seed(stream_seed(self.seed, epoch, -2)),
        )
        for batch, bad in loader:
            self._bad.update(bad)
            self.batch += 1  # counted before handing out: a checkpoint taken now resumes after it
            yield batch
        self.epoch, self.batch = epoch + 1, 0


def build_loader(
    root: Optional[Union[str, Path]] = None,
    backend: str = "auto",
    batch_size: int = 32,
    num_workers: int = 2,
    global_size: int = 224,
    local_size: int = 96,
    num_global: int = 8,
    num_local: int = 8,
    global_scale: Sequence[float] = (0.36, 1.0),
    local_scale: Sequence[float] = (0.06, 0.36),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    seed: int = 0,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    shuffle: bool = True,
    drop_last: bool = True,
    split: Optional[str] = "train",
    **backend_kwargs,
):
    """A multi-crop loader over `root` (None: the embedded shapes dataset).

    backend: "reference" (CPU workers, this module), "torchvision" or "dali" (GPU, from
    `stellar.data.gpu_loaders`), or "auto": dali where it imports and CUDA is available,
    torchvision where CUDA is available, else reference. All backends take the same keyword
    arguments; `backend_kwargs` go to the chosen backend (reference: `pin_memory`, and a
    `device` that it ignores: its batches stay on the CPU). `rank`/`world_size` default to
    torch.distributed's when a process group is initialized.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = pick_backend()
    # rank/world_size: explicit, else torch.distributed's when a process group is up, else (0, 1)
    rank, world_size = resolve_shard(rank, world_size)
    common = dict(batch_size=batch_size, num_workers=num_workers, global_size=global_size, local_size=local_size,
                  num_global=num_global, num_local=num_local, global_scale=global_scale, local_scale=local_scale,
                  seed=seed, rank=rank, world_size=world_size, shuffle=shuffle, drop_last=drop_last)
    if tuple(ratio) != (3.0 / 4.0, 4.0 / 3.0):  # the GPU backends take `ratio` only when it is not the default
        backend_kwargs["ratio"] = tuple(ratio)
    if backend == "torchvision":
        from stellar.data.gpu_loaders import build_torchvision_loader

        return build_torchvision_loader(root, split=split, **common, **backend_kwargs)
    if backend == "dali":
        from stellar.data.gpu_loaders import build_dali_loader

        return build_dali_loader(root, split=split, **common, **backend_kwargs)
    backend_kwargs.pop("device", None)
    unknown = set(backend_kwargs) - {"pin_memory", "ratio"}
    if unknown:
        raise TypeError(f"build_loader(backend='reference') got unknown arguments: {sorted(unknown)}")
    dataset = ImageFolderDataset(resolve_root(root, split), exts=IMAGE_EXTS)
    return ReferenceLoader(dataset, **common, **backend_kwargs)

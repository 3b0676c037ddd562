"""Features of a frozen model, for evaluation: batched, on the GPU when there is one, cached on
disk as safetensors, resumable, and split over the ranks of a torchrun launch.

    feats = extract(model, dataset, kinds=("pooled",), image_size=224, device="cuda",
                    cache=FeatureCache.for_model(cache_dir, model, dataset, settings))
    feats["pooled"]   # Tensor[M, D], in dataset order; feats["label"]: LongTensor[M]

Kinds, per image (``Stellar.encode``): ``pooled [D]`` the mean of the r sparse tokens (the kNN and
linear-probe feature, STELLAR.md section 7), ``cls [D]``, ``sparse [r, D]`` (S), ``L [N, r]``,
``Z [N, D]``, ``dense [N, D]``.

Images: ``dataset[i] -> (uint8 or [0,1] Tensor[3,H,W], label)``, centre square crop and resize to
``image_size`` (``prepare_images``), decoded and resized by DataLoader workers (``num_workers``,
at most one per CPU this process may use), pinned and copied to the device; the encoder runs
under bf16 autocast on CUDA (``amp``); the features are stored in float32 (or ``store_dtype``).

The cache, one folder per key under ``cache_dir``::

    <key>/meta.json                 what the key stands for (model fingerprint, data, settings)
    <key>/chunk_000012.safetensors  images [12 * chunk, 13 * chunk) while extraction runs
    <key>/features.safetensors      every image, once complete (the chunks are then removed)

The key hashes the model's weights (every tensor's bytes: a new or retrained checkpoint is a
new key, whatever its path or step), the data (root, every file's relative path and label, or the
subset's indices) and the settings (kinds, image size, amp, dtype). A chunk is written to a
temporary name and renamed, so a crash loses at most the chunks in flight: the next run with the
same key extracts only the missing chunks. When a key completes, older keys of the same *slot*
(the same checkpoint path, data and settings, other weights) are deleted: they can never be hit
again.

Under torchrun (``torch.distributed`` initialized) chunk c is extracted by rank c % world size;
the chunks are then gathered on rank 0 through ``gather_object`` (one chunk per rank at a time,
so no shared file system is assumed) and rank 0 alone returns the features (the others None).
The eval commands start the process group the way training does (``eval_process_group``:
``stellar.train.distributed.process_group``, with its timeout and heartbeat).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stellar.train import distributed

KINDS = ("pooled", "cls", "sparse", "L", "Z", "dense")
CACHE_VERSION = 1          # bump when what a key's features mean changes
FINAL = "features.safetensors"
META = "meta.json"


# --------------------------------------------------------------------------- distributed

@contextlib.contextmanager
def eval_process_group(device: torch.device, timeout_s: float | None = None) -> Iterator[None]:
    """torchrun's process group for the duration of an eval command: ``distributed.process_group``
    (nccl on CUDA, gloo on the CPU; the heartbeat that names a lost rank), as training starts it.

    timeout_s: bounds every collective (default: ``train.dist_timeout_s`` of the defaults file).
    Does nothing without torchrun's environment, or when a group already exists. Ranks leave the
    group together, at a barrier: rank 0 alone finishes some commands (the kNN vote, the linear
    probe) while the others wait there, their heartbeats going (a rank that left would be reported
    lost); that rank-0 tail must fit in ``timeout_s``, as every collective.
    """
    if timeout_s is None:
        from stellar.train.config import DEFAULTS_PATH, read_yaml

        timeout_s = read_yaml(DEFAULTS_PATH)["train"]["dist_timeout_s"]
    if device.type == "cuda" and distributed.launched_by_torchrun():
        torch.cuda.set_device(device)           # object collectives (gather_object) use the current device
    with distributed.process_group(device, timeout_s) as started:
        yield
        if started:
            distributed.barrier()


# --------------------------------------------------------------------------- fingerprints

def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer of ``model``: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dataset_fingerprint(dataset) -> dict | None:
    """What identifies a dataset's samples: an ImageFolderDataset's root and its files (relative
    paths, labels), through ``torch.utils.data.Subset`` indices; None for anything else."""
    if isinstance(dataset, torch.utils.data.Subset):
        inner = dataset_fingerprint(dataset.dataset)
        if inner is None:
            return None
        idx = hashlib.sha256(json.dumps([int(i) for i in dataset.indices]).encode()).hexdigest()
        return {**inner, "subset": idx, "count": len(dataset)}
    paths, labels, root = getattr(dataset, "paths", None), getattr(dataset, "labels", None), getattr(dataset, "root", None)
    if paths is None or labels is None or root is None:
        return None
    root = Path(root).resolve()
    h = hashlib.sha256()
    for p, y in zip(paths, labels):
        h.update(f"{Path(p).resolve().relative_to(root)}\t{int(y)}\n".encode())
    return {"root": str(root), "files": h.hexdigest(), "count": len(paths)}


# --------------------------------------------------------------------------- the cache

class FeatureCache:
    """One key's folder of chunk files and the final file (see the module docstring)."""

    def __init__(self, cache_dir: str | os.PathLike, key: str, meta: Mapping | None = None):
        self.root = Path(cache_dir)
        self.key = key
        self.dir = self.root / key
        self.meta = dict(meta or {})

    @classmethod
    def for_model(cls, cache_dir: str | os.PathLike, model: torch.nn.Module, dataset, settings: Mapping,
                  checkpoint: str | os.PathLike | None = None) -> "FeatureCache":
        """The cache entry of (model weights, dataset, settings); ``checkpoint`` only names the slot."""
        data = dataset_fingerprint(dataset)
        if data is None:
            raise ValueError("dataset has no fingerprint (not an ImageFolderDataset or a Subset of one): "
                             "pass cache=None")
        meta = {"version": CACHE_VERSION, "model": model_fingerprint(model), "data": data,
                "settings": dict(settings), "checkpoint": None if checkpoint is None else str(checkpoint)}
        key = hashlib.sha256(json.dumps({k: meta[k] for k in ("version", "model", "data", "settings")},
                                        sort_keys=True).encode()).hexdigest()[:24]
        slot = hashlib.sha256(json.dumps({k: meta[k] for k in ("version", "data", "settings", "checkpoint")},
                                         sort_keys=True).encode()).hexdigest()[:24]
        return cls(cache_dir, key, {**meta, "slot": slot})

    @property
    def final_path(self) -> Path:
        return self.dir / FINAL

    def chunk_path(self, c: int) -> Path:
        return self.dir / f"chunk_{c:06d}.safetensors"

    def has_final(self) -> bool:
        return self.final_path.is_file()

    def has_chunk(self, c: int) -> bool:
        return self.chunk_path(c).is_file()

    def load_final(self) -> dict[str, Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.final_path))

    def load_chunk(self, c: int) -> dict[str, Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.chunk_path(c)))

    def save_chunk(self, c: int, tensors: Mapping[str, Tensor]) -> None:
        self._write(self.chunk_path(c), tensors)

    def save_final(self, tensors: Mapping[str, Tensor], num_chunks: int) -> None:
        """Write the final file, remove the chunks and the slot's older keys."""
        self._write(self.final_path, tensors)
        for c in range(num_chunks):
            self.chunk_path(c).unlink(missing_ok=True)
        slot = self.meta.get("slot")
        if slot is None:
            return
        for other in self.root.iterdir():
            if other == self.dir or not (other / META).is_file():
                continue
            try:
                if json.loads((other / META).read_text()).get("slot") == slot:
                    shutil.rmtree(other, ignore_errors=True)
            except (OSError, ValueError):
                continue

    def _write(self, path: Path, tensors: Mapping[str, Tensor]) -> None:
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.dir / META
        if not meta_path.is_file():
            tmp_meta = meta_path.with_name(f".{META}.tmp-{os.getpid()}")
            tmp_meta.write_text(json.dumps(self.meta, indent=1))
            os.replace(tmp_meta, meta_path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)


# --------------------------------------------------------------------------- extraction

class EvalImages(torch.utils.data.Dataset):
    """``dataset[i] -> (image, label)`` as ``(Tensor[3, size, size] in [0,1], label, i)``
    (centre square crop and antialiased resize, no augmentation): what the workers run."""

    def __init__(self, dataset, image_size: int, indices: Sequence[int] | None = None):
        self.dataset = dataset
        self.image_size = int(image_size)
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        from .knn import prepare_images

        index = self.indices[i]
        image, label = self.dataset[index]
        return prepare_images([image], self.image_size)[0], int(label), index


def encode_kinds(model: torch.nn.Module, images: Tensor, kinds: Sequence[str]) -> dict[str, Tensor]:
    """``model.encode(images)`` -> the requested kinds (see KINDS), float32."""
    out = model.encode(images)
    got = {}
    for kind in kinds:
        if kind == "pooled":
            got[kind] = out["sparse"].float().mean(dim=1)                     # B x D
        elif kind == "cls":
            got[kind] = out["cls"][:, 0].float()                              # B x D
        else:
            got[kind] = out[kind].float()                                     # B x r x D, B x N x r, B x N x D
    return got


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto``: this process's GPU where CUDA is available (``cuda:LOCAL_RANK`` under torchrun), else
    the CPU. A CUDA device always gets an index: a bare ``cuda`` is this process's GPU, as for the
    loaders (``stellar.data.loader.resolve_device``), never device 0 on every rank."""
    from stellar.data.loader import default_device, resolve_device as data_device

    if str(device) == "auto":
        return default_device()
    device = torch.device(device)
    return data_device(device) if device.type == "cuda" else device


def _autocast(device: torch.device, amp: str):
    if amp not in ("auto", "bf16", "fp32"):
        raise ValueError(f"amp must be auto, bf16 or fp32, got {amp!r}")
    enabled = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def extract(model: torch.nn.Module, dataset, kinds: Sequence[str] = ("pooled",), image_size: int = 224,
            batch_size: int = 256, device: str | torch.device = "cpu", num_workers: int = 0,
            amp: str = "auto", store_dtype: torch.dtype = torch.float32, cache: FeatureCache | None = None,
            chunk_size: int = 4096, progress: bool | str = True) -> dict[str, Tensor] | None:
    """Every image's features, in dataset order: ``{kind: Tensor[M, ...], "label": LongTensor[M]}``.

    Returns None on ranks other than 0 of a distributed run. ``progress``: a tqdm bar (images/s)
    on rank 0, or a string to name it.
    """
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {list(kinds)}")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    device = resolve_device(device)
    rank, world = distributed.rank(), distributed.world_size()
    total = len(dataset)
    if total == 0:
        raise ValueError("the dataset is empty")
    desc = progress if isinstance(progress, str) else "features"

    if cache is not None and distributed.broadcast_from_main(cache.has_final() if rank == 0 else None):
        if rank == 0 and progress:
            print(f"{desc}: {total} images from the cache {cache.final_path}", flush=True)
        return cache.load_final() if rank == 0 else None

    num_chunks = -(-total // chunk_size)
    mine = [c for c in range(num_chunks) if c % world == rank]
    done = {c for c in mine if cache is not None and cache.has_chunk(c)}
    todo = [c for c in mine if c not in done]
    held: dict[int, dict[str, Tensor]] = {}            # chunks extracted here and not cached
    if todo:
        held = _extract_chunks(model, dataset, todo, kinds, image_size, batch_size, device, num_workers, amp,
                               store_dtype, cache, chunk_size, total, bool(progress) and rank == 0, desc,
                               resumed=len(done))
    chunks = _gather_chunks(held, cache, num_chunks, rank, world)
    if rank != 0:
        distributed.barrier()
        return None
    out = {k: torch.cat([chunks[c][k] for c in range(num_chunks)]) for k in chunks[0]}
    if cache is not None:
        cache.save_final(out, num_chunks)
    distributed.barrier()
    return out


def _extract_chunks(model, dataset, todo, kinds, image_size, batch_size, device, num_workers, amp, store_dtype,
                    cache, chunk_size, total, show, desc, resumed):
    """Extract the chunks ``todo`` (ascending) in one pass of a DataLoader over their images."""
    from tqdm import tqdm

    num_workers = min(num_workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else num_workers)
    bounds = {c: (c * chunk_size, min((c + 1) * chunk_size, total)) for c in todo}
    indices = [i for c in todo for i in range(*bounds[c])]
    loader = torch.utils.data.DataLoader(
        EvalImages(dataset, image_size, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda", persistent_workers=False)
    was_training = model.training
    model.eval()
    held: dict[int, dict[str, Tensor]] = {}
    pending: dict[str, list[Tensor]] = {}
    queue = list(todo)
    note = f" ({resumed} chunks from a previous run)" if resumed else ""
    bar = tqdm(total=len(indices), desc=desc + note, unit="img", unit_scale=True, disable=not show,
               dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for images, labels, _ in loader:
            x = images.to(device, non_blocking=True)
            with _autocast(device, amp):
                got = encode_kinds(model, x, kinds)
            got = {k: v.to(store_dtype).cpu() for k, v in got.items()}       # synchronises with the device
            got["label"] = labels.long()
            for k, v in got.items():
                pending.setdefault(k, []).append(v)
            bar.update(len(labels))
            # Flush every chunk that is complete (a batch may straddle two chunks).
            while queue and sum(len(v) for v in pending["label"]) >= bounds[queue[0]][1] - bounds[queue[0]][0]:
                c = queue.pop(0)
                n = bounds[c][1] - bounds[c][0]
                joined = {k: torch.cat(v) for k, v in pending.items()}
                chunk = {k: v[:n] for k, v in joined.items()}
                pending = {k: [v[n:]] for k, v in joined.items()}
                if cache is not None:
                    cache.save_chunk(c, chunk)
                else:
                    held[c] = chunk
    finally:
        bar.close()
        model.train(was_training)
    if queue:
        raise RuntimeError(f"the loader ended before chunks {queue} were complete")
    if show:
        seconds = time.perf_counter() - start
        print(f"{desc}: {len(indices)} images in {seconds:.1f} s ({len(indices) / max(seconds, 1e-9):.0f} img/s)",
              flush=True)
    return held


def _gather_chunks(held, cache, num_chunks, rank, world) -> dict[int, dict[str, Tensor]]:
    """All chunks on rank 0 (``{c: tensors}``), from this process or, one round at a time, from the others."""
    def local(c):
        return held[c] if c in held else cache.load_chunk(c)

    if world == 1:
        return {c: local(c) for c in range(num_chunks)}
    chunks: dict[int, dict[str, Tensor]] = {}
    for k in range(-(-num_chunks // world)):           # one chunk per rank and round
        c = k * world + rank
        got = distributed.gather_to_main((c, local(c)) if c < num_chunks else None)
        if rank == 0:
            chunks.update(entry for entry in got if entry is not None)
    return chunks


def save_features(path: str | os.PathLike, features: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> Path:
    """Write ``features`` to ``path`` (safetensors; ``metadata`` values as JSON strings), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in features.items()}, str(tmp),
              metadata={k: json.dumps(v) for k, v in metadata.items()})
    os.replace(tmp, path)
    return path

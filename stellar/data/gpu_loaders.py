"""The `dali` and `torchvision` loader backends: decode on the GPU, then the fused multi-crop op.

Both read an ImageFolder tree (`root[/split]/<class>/**/*.jpg`, classes sorted by name), decode
every image to uint8 RGB and hand the batch to `stellar.data.multicrop.MultiCrop`, which draws the
[K, 12] crop rows and runs `torch.ops.stellar.multicrop` on the images' device. A batch is the
dict of docs/design.md: `image [B,3,S,S]`, `global_views [B,G,3,S,S]`, `local_views
[B,Lc,3,s,s]` (views in [0, 1]), `label [B]`, plus `crops` (the rows).

Order, shards and resume (the same for both backends, so they yield the same files):
- the files on a bad-file list (`stellar data check`, see `stellar.data.check`) are dropped
  first; with no list and `check=True` the folder is checked before the first epoch;
- each epoch permutes the remaining files with a generator seeded by (seed, epoch) (identity when
  `shuffle=False`), identically on every rank; rank r takes the contiguous slice
  `shard_range(n, r, world_size)` of it (DALI's split), so shards are disjoint and cover the
  folder; rank and world size come from torch.distributed when initialized;
- a file that fails to decode at run time is skipped (DALI: the pipeline is rebuilt without
  it, starting where the last one stopped), remembered for later epochs and counted in
  `skipped`; the epoch goes on with full batches;
- `state_dict()` holds (epoch, samples yielded this epoch, files skipped at run time), and the
  crop rows of batch b are drawn from a generator seeded by (seed, rank, epoch, b), so a
  resumed loader yields exactly the batches the interrupted one would have.
Shards differ in size by at most one file, so ranks may differ by one batch at the end of an
epoch unless `drop_last` (whose count, `len(loader)`, is then the same on every rank up to one
file's worth; trim with the smallest `len` across ranks if steps must match exactly).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from stellar.data import check as _check
from stellar.data import dali as _dali
from stellar.data.loader import stream_seed

__all__ = ["build_torchvision_loader", "build_dali_loader", "DaliLoader", "TorchvisionLoader", "list_image_folder"]


def list_image_folder(root, split: str | None = None) -> tuple[list[str], list[int], list[str]]:
    """(files, labels, classes) of an image folder, as the reference loader reads it.

    The folder is `root/split` when that exists, else `root` (`stellar.data.loader.resolve_root`;
    root None is the embedded shapes dataset); classes are its sorted subfolders, or none with
    every file labelled 0 (`stellar.data.folder.list_images`). Files are absolute paths.
    """
    from stellar.data.folder import IMAGE_EXTS, list_images
    from stellar.data.loader import resolve_root

    folder = resolve_root(root, split)
    if not folder.is_dir():
        raise NotADirectoryError(f"root must be an image folder, got {str(folder)!r}")
    paths, labels, classes = list_images(folder, IMAGE_EXTS)
    if not paths:
        raise ValueError(f"root {str(folder)!r} holds no images ({', '.join(IMAGE_EXTS)})")
    return [str(p.resolve()) for p in paths], list(labels), list(classes)


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class _FolderLoader:
    """What both backends share: the file list, bad files, epoch order, shards, state, views."""

    backend = "?"

    def __init__(
        self,
        root,
        batch_size: int = 64,
        num_workers: int = 4,
        global_size: int = 224,
        local_size: int = 96,
        num_global: int = 8,
        num_local: int = 8,
        global_scale=(0.36, 1.0),
        local_scale=(0.06, 0.36),
        ratio=(3.0 / 4.0, 4.0 / 3.0),
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        drop_last: bool = True,
        split: str | None = "train",
        device=None,
        check: bool = True,
        bad_list=None,
        views: str = "op",
    ):
        self.batch_size = _positive_int("batch_size", batch_size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
        self.num_workers = num_workers
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.rank, self.world_size = _dali.resolve_shard(rank, world_size)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        from stellar.data.loader import resolve_root

        self.folder = resolve_root(root, split)
        self.files, self.labels, self.classes = list_image_folder(root, split)
        self._label_table = torch.tensor(self.labels, dtype=torch.long)

        # Bad files known before the first epoch: the lists of `stellar data check`, else a check now.
        lists = [Path(bad_list)] if bad_list is not None else []
        lists += [_check.default_list_path(self.folder)]
        lists += [_check.default_list_path(root)] if root is not None else []
        present = [p for p in dict.fromkeys(lists) if p.is_file()]
        if bad_list is not None and not Path(bad_list).is_file():
            raise FileNotFoundError(f"bad_list {str(bad_list)!r} does not exist (write it with `stellar data check DIR`)")
        listed = set().union(*(_check.read_bad_list(p) for p in present)) if present else set()
        if not present and check:
            listed = self._check_folder()
        self._listed_bad = {i for i, f in enumerate(self.files) if f in listed}
        self._good = [i for i in range(len(self.files)) if i not in self._listed_bad]
        if not self._good:
            raise ValueError(f"root {str(self.folder)!r}: every image is on the bad-file list")
        self._runtime_bad: set[int] = set()  # file indices that failed to decode at run time

        self._epoch = 0
        self._position = 0  # samples yielded in this epoch
        self._views_kw = dict(
            global_size=_positive_int("global_size", global_size),
            local_size=_positive_int("local_size", local_size),
            num_global=num_global,
            num_local=num_local,
            global_scale=tuple(global_scale),
            local_scale=tuple(local_scale),
            ratio=tuple(ratio),
        )
        # "op": torch.ops.stellar.multicrop (raises now when stellar._C is not built: no silent
        # fallback); "reference": its plain PyTorch twin on the CPU (slow, for checks).
        if views not in ("op", "reference"):
            raise ValueError(f"views must be 'op' or 'reference', got {views!r}")
        self._multicrop = self._make_multicrop(views)

    # -- bad files ---------------------------------------------------------------------------
    def _check_folder(self) -> set[str]:
        """Check the folder before the first epoch; write the list beside it when writable."""
        try:
            return set(_check.check_images(self.folder, num_workers=max(1, self.num_workers))["bad"])
        except OSError:  # a read-only dataset: check without keeping the list
            reasons = {f: _check.check_file(f) for f in self.files}
            return {f for f, r in reasons.items() if r is not None}

    @property
    def skipped(self) -> int:
        """Files this loader leaves out: listed as bad before the first epoch plus failed at run time."""
        return len(self._listed_bad) + len(self._runtime_bad)

    def _skip(self, index: int, error) -> None:
        if index not in self._runtime_bad:
            self._runtime_bad.add(index)
            warnings.warn(
                f"stellar loader ({self.backend}): skipping {self.files[index]}: {error} "
                f"(run `stellar data check {self.folder}` to list such files up front)",
                RuntimeWarning,
                stacklevel=3,
            )

    # -- order ---------------------------------------------------------------------------------
    def _epoch_files(self, epoch: int) -> list[int]:
        """All ranks' order of this epoch: file indices (bad-listed ones dropped)."""
        good = self._good
        if not self.shuffle:
            return list(good)
        g = torch.Generator().manual_seed(stream_seed(self.seed, epoch, -1))
        return [good[j] for j in torch.randperm(len(good), generator=g).tolist()]

    def _own_files(self, epoch: int) -> list[int]:
        """This rank's files of the epoch, in order, without those that failed at run time."""
        order = self._epoch_files(epoch)
        start, end = _dali.shard_range(len(order), self.rank, self.world_size)
        return [i for i in order[start:end] if i not in self._runtime_bad]

    def epoch_files(self, epoch: int | None = None) -> list[str]:
        """This rank's files of `epoch` (default: the current one) in the order they are read,
        without the bad ones known so far."""
        return [self.files[i] for i in self._own_files(self._epoch if epoch is None else epoch)]

    def _num_batches(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        return self._num_batches(len(self._own_files(self._epoch)))

    # -- state -----------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` at its first batch on the next iteration; the current epoch keeps
        its position (so a resumed run may call it), as the reference loader."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if epoch != self._epoch:
            self._epoch, self._position = epoch, 0

    @property
    def epoch(self) -> int:
        return self._epoch

    def state_dict(self) -> dict:
        """Where the next iteration starts: epoch, samples already yielded in it, run-time skips."""
        return {
            "backend": self.backend,
            "epoch": self._epoch,
            "position": self._position,
            "batch": self._position // self.batch_size,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "runtime_bad": sorted(self.files[i] for i in self._runtime_bad),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; a reference loader's {"epoch", "batch"} is accepted too."""
        if "epoch" not in state or ("position" not in state and "batch" not in state):
            raise KeyError(f"state must hold 'epoch' and 'position' (a loader's state_dict()), got keys {sorted(state)}")
        position = int(state["position"]) if "position" in state else int(state["batch"]) * self.batch_size
        if int(state["epoch"]) < 0 or position < 0:
            raise ValueError(f"state must hold a non-negative epoch and position, got {state}")
        index = {f: i for i, f in enumerate(self.files)}
        self._runtime_bad = {index[f] for f in state.get("runtime_bad", ()) if f in index}
        self._epoch, self._position = int(state["epoch"]), position

    # -- views -------------------------------------------------------------------------------------
    def _make_multicrop(self, views):
        from stellar.data.multicrop import MultiCrop

        return MultiCrop(**self._views_kw, seed=self.seed, rank=self.rank, backend=views)

    def _views(self, images: list[torch.Tensor], indices: list[int], epoch: int, batch: int) -> dict:
        """The batch dict for uint8 HWC images (on the device) of the files `indices`."""
        # rows of batch b drawn from (seed, rank, epoch, b): a resumed loader draws the same crops
        self._multicrop.generator.manual_seed(stream_seed(self.seed, self.rank, epoch, batch))
        labels = self._label_table[torch.tensor(indices, dtype=torch.long)].to(self.device)
        return self._multicrop(images, labels, layout="HWC")

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self):
        """Batch dicts (module docstring) for the rest of the current epoch."""
        for epoch, batch, images, indices in self._batches():
            yield self._views(images, indices, epoch, batch)

    def iter_decoded(self):
        """(images, labels) for the rest of the current epoch, without the views: images a list of
        uint8 Tensor[H_i, W_i, 3] RGB on the loader's device (DALI's buffers: valid until the
        next batch), labels LongTensor[B]. Decode alone, for benchmarks and checks."""
        for _, _, images, indices in self._batches():
            yield images, self._label_table[torch.tensor(indices, dtype=torch.long)]

    def _batches(self):
        own = self._own_files(self._epoch)
        if self._position >= len(own) or (self.drop_last and len(own) - self._position < self.batch_size):
            self._epoch, self._position = self._epoch + 1, 0  # that epoch is done: the next one
            own = self._own_files(self._epoch)
        epoch = self._epoch
        for images, indices in self._decoded_batches(own, self._position):
            batch = self._position // self.batch_size
            self._position += len(indices)  # before the yield: state_dict() counts this batch as consumed
            yield epoch, batch, images, indices
        self._epoch, self._position = epoch + 1, 0

    def _decoded_batches(self, own: list[int], start: int):
        """Yield (images, file indices) for own[start:] in full batches (the last one partial
        unless drop_last), skipping files that fail to decode."""
        raise NotImplementedError


class DaliLoader(_FolderLoader):
    """The `dali` backend: `stellar.data.dali` pipelines (GPU "mixed" decode, or CPU without a GPU)."""

    backend = "dali"

    def __init__(self, root, prefetch: int = 2, **kw):
        _dali.require_dali()
        self.prefetch = _positive_int("prefetch", prefetch)
        super().__init__(root, **kw)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be a CUDA device or the CPU for DALI, got {self.device}")
        self._device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        # DALI decodes JPEG, PNG, WebP, BMP, TIFF, PNM and JPEG 2000, not GIF: those are left out up front.
        gifs = {i for i in self._good if self.files[i].lower().endswith(".gif")}
        if gifs:
            warnings.warn(f"DALI cannot decode GIF: leaving out {len(gifs)} file(s) under {self.folder}", RuntimeWarning, stacklevel=2)
            self._listed_bad |= gifs
            self._good = [i for i in self._good if i not in gifs]
        self.rebuilds = 0  # pipelines rebuilt after a decode failure

    def _pipeline(self, paths, shard_id, num_shards):
        return _dali.build_pipeline(
            paths,
            self.batch_size,
            shard_id=shard_id,
            num_shards=num_shards,
            device_id=self._device_id,
            num_threads=max(1, self.num_workers),
            seed=self.seed + self.rank,
            prefetch=self.prefetch,
        )

    def _decoded_batches(self, own, start):
        bs = self.batch_size
        end = len(own) - (len(own) - start) % bs if self.drop_last else len(own)
        pos = start
        # A fresh epoch reads the whole epoch list and lets the reader take this rank's shard;
        # after a failure or on resume the pipeline reads this rank's remaining files only.
        full = self._epoch_files(self._epoch)
        s, e = _dali.shard_range(len(full), self.rank, self.world_size)
        if start == 0 and full[s:e] == own:
            paths, source, shard = [self.files[i] for i in full], full, (self.rank, self.world_size)
        else:
            paths, source, shard = None, None, (0, 1)
        while pos < end:
            if paths is None:
                source = own[pos:]
                paths = [self.files[i] for i in source]
            pipe = self._pipeline(paths, *shard)
            try:
                while pos < end:
                    images, idx = _dali.run_to_torch(pipe)
                    n = min(bs, end - pos)
                    indices = [source[j] for j in idx[:n].tolist()]
                    if indices != own[pos : pos + n]:
                        raise RuntimeError(
                            f"DALI reader order mismatch at sample {pos} of rank {self.rank}'s shard"
                        )
                    yield images[:n], indices
                    pos += n
            except RuntimeError as error:
                if "order mismatch" in str(error):
                    raise
                bad = self._find_bad(own, pos, error)
                for i in bad:
                    self._skip(i, "DALI could not decode it")
                own[:] = [i for i in own if i not in bad]
                end = len(own) - (len(own) - start) % bs if self.drop_last else len(own)
                paths, shard = None, (0, 1)
                self.rebuilds += 1
            finally:
                del pipe

    def _find_bad(self, own, pos, error) -> set[int]:
        """The files of the failing batch (or those prefetched after it) that do not decode."""
        window = own[pos : pos + self.batch_size * (self.prefetch + 1)]
        named = _dali.failed_file(error)
        if named is not None:
            named = str(Path(named).resolve())
            hit = {i for i in window if self.files[i] == named}
            if hit:
                return hit
        bad = {i for i in window if _check.check_file(self.files[i], full=True) is not None}
        if not bad:
            raise RuntimeError(
                f"DALI failed on rank {self.rank}'s batch at sample {pos} of epoch {self._epoch}, "
                "and every file of it decodes on its own"
            ) from error
        return bad


class _ReadFiles(torch.utils.data.Dataset):
    """Files by path: (position, bytes or decoded image, error) per item, for DataLoader workers.

    decode=True decodes on the CPU in the worker (uint8 Tensor[3, H, W]); False returns the raw
    bytes (uint8 Tensor[n]) for a batched GPU decode in the main process.
    """

    def __init__(self, paths: list[str], decode: bool):
        self.paths, self.decode = paths, decode

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from torchvision.io import read_file

        try:
            data = read_file(self.paths[i])
            return i, (_check.decode_rgb(data) if self.decode else data), None
        except Exception as e:  # noqa: BLE001 - the main process skips and counts the file
            return i, None, " ".join(str(e).split())[:200] or type(e).__name__


def _as_list(batch):
    return batch


class TorchvisionLoader(_FolderLoader):
    """The `torchvision` backend: `torchvision.io.decode_jpeg` batched on the GPU (nvJPEG) where
    there is one, `decode_image` on the CPU otherwise (in the DataLoader workers), then the op."""

    backend = "torchvision"

    def _decoded_batches(self, own, start):
        gpu = self.device.type == "cuda"
        paths = [self.files[i] for i in own[start:]]
        reader = torch.utils.data.DataLoader(
            _ReadFiles(paths, decode=not gpu),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_as_list,
            pin_memory=False,
        )
        pending_images, pending_indices = [], []
        for items in reader:
            images, positions, failures = self._decode(items) if gpu else self._collect(items)
            for p, error in failures:
                self._skip(own[start + p], error)
            pending_images += images
            pending_indices += [own[start + p] for p in positions]
            while len(pending_indices) >= self.batch_size:
                yield pending_images[: self.batch_size], pending_indices[: self.batch_size]
                del pending_images[: self.batch_size], pending_indices[: self.batch_size]
        if pending_indices and not self.drop_last:
            yield pending_images, pending_indices

    @staticmethod
    def _collect(items):
        """CPU: the workers decoded. Returns ([uint8 HWC views], positions, [(position, error)])."""
        images, positions, failures = [], [], []
        for p, img, error in items:
            if error is not None:
                failures.append((p, error))
            else:
                images.append(img.permute(1, 2, 0))
                positions.append(p)
        return images, positions, failures

    def _decode(self, items):
        """GPU: one batched nvJPEG call for the JPEGs, the CPU decoder (then a copy) for the rest.
        Returns as `_collect`."""
        from torchvision.io import ImageReadMode, decode_jpeg

        decoded = {p: RuntimeError(error) for p, _, error in items if error is not None}
        jpegs = [(p, d) for p, d, error in items if error is None and bytes(d[:3].tolist()) == b"\xff\xd8\xff"]
        if jpegs:
            try:
                out = decode_jpeg([d for _, d in jpegs], mode=ImageReadMode.RGB, device=self.device)
                decoded.update({p: img for (p, _), img in zip(jpegs, out)})
            except RuntimeError:  # one bad file fails the batched call: decode one by one
                for p, d in jpegs:
                    try:
                        decoded[p] = decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device)
                    except RuntimeError as e:
                        decoded[p] = e
        images, positions, failures = [], [], []
        for p, data, _ in items:
            if p not in decoded:
                try:
                    decoded[p] = _check.decode_rgb(data).to(self.device, non_blocking=True)
                except Exception as e:  # noqa: BLE001 - skipped and counted
                    decoded[p] = e
            result = decoded[p]
            if isinstance(result, torch.Tensor):
                images.append(result.permute(1, 2, 0))
                positions.append(p)
            else:
                failures.append((p, " ".join(str(result).split())[:200]))
        return images, positions, failures


def build_torchvision_loader(root, **kw) -> TorchvisionLoader:
    """The `torchvision` backend (see the module docstring); keyword arguments as `build_loader`."""
    return TorchvisionLoader(root, **kw)


def build_dali_loader(root, **kw) -> DaliLoader:
    """The `dali` backend (see the module docstring); raises ImportError with the install command
    when DALI is missing (no silent fallback to another backend)."""
    return DaliLoader(root, **kw)

"""Multi-crop loaders: one design for every backend; a backend only decides where bytes become pixels.

A batch, from folder to device (read top-down; each step is one module, imported one way only):

    spec.py    ViewSpec: sizes, counts, crop ranges, colour and mask parameters (from the config)
    order.py   SampleOrder: (seed, epoch, world size, rank) -> this rank's slice of each global
               batch: positions p in the epoch's order and the files at them
    loader.py  reader workers (DataLoader): read each file's bytes, screen them, and
                 - reference:   decode them (Pillow, the reference) ...
                 - torchvision: decode them (libjpeg-turbo / libpng) on the CPU, or pass JPEGs on
                 - dali:        pass them on (formats DALI does not decode: the reference)
               a file that cannot be decoded gives way to the next one that can (order.py)
    decode.py  the decoders' common rules: 8-bit RGB, EXIF orientation, the screen
    dali.py    ... then, in this process on the loader's device (a side CUDA stream on a GPU):
                 - torchvision on a GPU: batched nvJPEG;  - dali: the DALI pipeline (mixed | cpu)
    draws.py   each sample's random draws from (seed, epoch, p): crop rows and kept patches
    multicrop.py  the view step (the fused op, or its PyTorch twin) where the pixels are:
               in the workers for the reference (CPU), in this process for the others

Every backend yields the same batches for the same seed: the same samples in the same order,
the same crop rows and masks, and views equal to the reference's within the decoders'
difference. A batch (views on the loader's device, the rest on the CPU):

    image         Tensor[B, 3, S, S]       in [0, 1] (ViewSpec.dtype), no colour augmentation
    global_views  Tensor[B, G, 3, S, S]    view 0 is `image`'s crop plus colour augmentation
    local_views   Tensor[B, Lc, 3, s, s]
    label         LongTensor[B]
    index         LongTensor[B]            the files' indices in `loader.files` (after substitution)
    crops         Tensor[B * (1 + G + Lc), 12]   the crop rows used (stellar.data.draws layout)
    keep          LongTensor[B, G, n_keep]  sorted patches each masked global view keeps

Position and resume: `state_dict()` = {"epoch", "position", "seed", "global_batch"}, the same
format on every backend and rank (`stellar.data.order`); `load_state_dict` continues exactly,
on any world size. `bad_files` names every file met that could not be decoded (and those on a
`stellar data check` list), with the reason; `skipped` counts them.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset

from stellar.data import check as _check
from stellar.data import dali as _dali
from stellar.data import decode as _decode
from stellar.data.draws import SampleDraws, draw_samples
from stellar.data.folder import IMAGE_EXTS, list_images
from stellar.data.multicrop import make_batch, resolve_views
from stellar.data.order import SampleOrder, Slice, resolve_shard, stream_seed
from stellar.data.spec import ViewSpec

__all__ = ["BACKENDS", "build_loader", "pick_backend", "backend_info", "default_device", "resolve_device",
           "resolve_root",
           "Loader", "ReferenceLoader", "TorchvisionLoader", "DaliLoader"]

BACKENDS = ("auto", "reference", "torchvision", "dali")
log = logging.getLogger("stellar.data")


# ----------------------------------------------------------------------------------------------
# where: folder, device, backend
# ----------------------------------------------------------------------------------------------
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


def default_device() -> torch.device:
    """This process's GPU, `cuda:LOCAL_RANK` under torchrun (else the current device), or the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = os.environ.get("LOCAL_RANK")
    if local is not None and local.isdigit():
        if int(local) >= torch.cuda.device_count():   # as the trainer's pick_device: never a shared GPU
            raise RuntimeError(f"LOCAL_RANK={local} but this machine shows {torch.cuda.device_count()} GPUs: "
                               "start at most that many processes per machine (--nproc_per_node)")
        return torch.device("cuda", int(local))
    return torch.device("cuda", torch.cuda.current_device())


def resolve_device(device) -> torch.device:
    """`device` with an index for CUDA (never a bare "cuda": that is device 0 for DALI and nvJPEG)."""
    if device is None:
        return default_device()
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device must be the CPU on a machine without CUDA, got {device}")
        if device.index is None:
            device = default_device()
    elif device.type != "cpu":
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {device}")
    return device


def pick_backend(device=None) -> tuple[str, str]:
    """(backend, why) for backend="auto": dali on a GPU where DALI imports, else torchvision on a
    GPU, else reference. A DALI that is installed but fails to import is warned about."""
    device = resolve_device(device)
    if device.type != "cuda":
        return "reference", "no GPU: Pillow decodes in DataLoader workers"
    ok, why = _dali.dali_status()
    if ok:
        return "dali", f"DALI imports and the device is {device}"
    if why.startswith("ModuleNotFoundError"):
        return "torchvision", f"DALI is not installed ({why})"
    warnings.warn(f"backend='auto': DALI is installed but does not import ({why}); using the torchvision backend. "
                  f"Fix the install or set data.backend explicitly.", RuntimeWarning, stacklevel=3)
    return "torchvision", f"DALI is installed but does not import ({why})"


def backend_info() -> dict:
    """What `stellar info` prints about the loaders: the backend auto picks here and why, DALI."""
    backend, why = pick_backend()
    ok, dali_why = _dali.dali_status()
    return {"auto_backend": backend, "why": why, "dali": "imports" if ok else f"unavailable: {dali_why}",
            "device": str(default_device())}


# ----------------------------------------------------------------------------------------------
# the reader workers: a slice of a global batch -> files' bytes or pixels (with substitution)
# ----------------------------------------------------------------------------------------------
def _encoded(data: bytes, info) -> dict:
    return {"encoded": torch.frombuffer(bytearray(data), dtype=torch.uint8), "orientation": info.orientation}


def _pass_jpeg_on(data: bytes, name: str):
    """torchvision on a GPU: 8-bit YCbCr / grayscale JPEGs go to nvJPEG; other files are decoded here."""
    info = _decode.probe_bytes(data, name)
    if info.format == "jpeg" and info.channels in (1, 3) and not {"cmyk", "ycck"} & set(info.notes):
        return _encoded(data, info)
    return _decode.decode_bytes_torchvision(data, name, screen=False)


def _pass_dali_formats_on(data: bytes, name: str):
    """dali: 8-bit JPEG, PNG and WebP go to the pipeline; other formats are decoded here (reference)."""
    info = _decode.probe_bytes(data, name)
    if info.format in ("jpeg", "png", "webp") and info.bit_depth <= 8:
        return _encoded(data, info)
    return _decode.decode_bytes(data, name, screen=False)


class _Reader(Dataset):
    """Slice -> {"indices": files used, "bad": {path: reason} met, and either "pixels" (per sample
    uint8 Tensor[3, H, W], or {"encoded", "orientation"} for the device decoder) with the samples'
    draws ("uniforms", "keep"), or with `views` (the reference) the finished batch under "batch"}.
    Runs in DataLoader workers."""

    def __init__(self, files, order: SampleOrder, listed_bad, worker_decode, spec=None, seed=0, views=None):
        self.files, self.order, self.listed_bad = files, order, listed_bad
        self.worker_decode, self.spec, self.seed, self.views = worker_decode, spec, seed, views

    def __len__(self):
        return len(self.files)

    def load(self, index: int, bad: dict):
        """(file index used, payload) for a sample of file `index`: it, or the next good one."""
        for j in self.order.candidates(index):  # the substitution rule of every backend
            path = self.files[j]
            if path in self.listed_bad:
                bad[path] = self.listed_bad[path]
                continue
            try:
                return j, self.worker_decode(_decode.read_bytes(path), path)
            except _decode.DecodeError as e:
                bad[path] = e.reason
        raise RuntimeError(f"none of the {len(self.files)} images could be decoded (e.g. {self.files[index]}: "
                           f"{bad.get(self.files[index])})")

    def __getitem__(self, sl: Slice) -> dict:
        bad: dict = {}
        used, pixels = zip(*(self.load(i, bad) for i in sl.indices))
        # the draws are made here too: they need only (seed, epoch, position), and the workers run in parallel
        draws = draw_samples(self.spec, self.seed, sl.epoch, sl.positions)
        out = {"indices": list(used), "bad": bad}
        if self.views is not None:  # the pixels are here (CPU): make the views here too
            out["batch"] = make_batch([im.permute(1, 2, 0) for im in pixels], draws, self.spec, self.views)
        else:
            out.update(pixels=list(pixels), uniforms=draws.uniforms, keep=draws.keep)
        return out


# ----------------------------------------------------------------------------------------------
# the loader
# ----------------------------------------------------------------------------------------------
class Loader:
    """What every backend shares: files, order, bad files, state, iteration, the view step.

    Subclasses say what the reader workers do with a file's bytes (`_worker_decode`) and, when
    the pixels are made in this process, how (`_pixels`). Arguments: see `build_loader`.
    """

    backend = "?"
    default_views = "op"
    chosen = "the class asked for"  # why this backend: build_loader says whether auto picked it

    def __init__(self, root=None, spec: Optional[ViewSpec] = None, batch_size: int = 32, *, num_workers: int = 2,
                 seed: int = 0, rank: Optional[int] = None, world_size: Optional[int] = None, shuffle: bool = True,
                 drop_last: bool = True, split: Optional[str] = "train", device=None, views: Optional[str] = None,
                 check: bool = False, bad_list=None, pin_memory: Optional[bool] = None):
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        self.spec = spec if spec is not None else ViewSpec()
        if not isinstance(self.spec, ViewSpec):
            raise ValueError(f"spec must be a ViewSpec, got {type(self.spec).__name__}")
        self.num_workers, self.seed = num_workers, int(seed)
        self.device = resolve_device(device)
        # where the view step runs: the workers (CPU) for the reference, else the loader's device
        self.views = resolve_views(views or self.default_views, "cpu" if self._views_in_workers() else self.device)
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)

        self.folder = resolve_root(root, split)
        if not self.folder.is_dir():
            raise NotADirectoryError(f"root must be an image folder, got {str(self.folder)!r}")
        paths, labels, self.classes = list_images(self.folder, IMAGE_EXTS)
        if not paths:
            raise ValueError(f"root {str(self.folder)!r} holds no images ({', '.join(IMAGE_EXTS)})")
        self.files = [str(p.resolve()) for p in paths]
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.order = SampleOrder(len(self.files), batch_size, self.seed, *resolve_shard(rank, world_size),
                                 shuffle=shuffle, drop_last=drop_last)
        self.batch_size, self.rank, self.world_size = batch_size, self.order.rank, self.order.world_size
        self.bad_files: dict[str, str] = self._listed_bad(root, check, bad_list)
        self._listed = dict(self.bad_files)
        self._epoch, self._position = 0, 0
        self._reported = len(self.bad_files)

    def _listed_bad(self, root, check: bool, bad_list) -> dict:
        """{path: reason} of the files known to be bad before the first epoch: the lists of
        `stellar data check` (an explicit `bad_list` and the folder's own), or a check now when none exists."""
        if bad_list is not None and not Path(bad_list).is_file():
            raise FileNotFoundError(f"bad_list {str(bad_list)!r} does not exist (write it with `stellar data check DIR`)")
        lists = [Path(bad_list)] if bad_list is not None else []
        lists += [_check.default_list_path(self.folder)] + ([_check.default_list_path(root)] if root is not None else [])
        present = [p for p in dict.fromkeys(lists) if p.is_file()]
        if not present and check:
            return dict(_check.check_images(self.folder)["reasons"])
        known = set(self.files)
        reasons = {}
        for p in present:
            reasons.update({f: r for f, r in _check.read_bad_reasons(p).items() if f in known})
        return reasons

    # -- size, position, state --------------------------------------------------------------------
    def __len__(self) -> int:
        """This rank's batches in a whole epoch."""
        return len(self.order)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def skipped(self) -> int:
        return len(self.bad_files)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` at its first batch; the current epoch keeps its position (a resumed
        run may call it)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if epoch != self._epoch:
            self._epoch, self._position = epoch, 0

    def state_dict(self) -> dict:
        """{"epoch", "position" (samples of the epoch's order handed out by all ranks), "seed", "global_batch"}."""
        return self.order.state(self._epoch, self._position)

    def load_state_dict(self, state: dict) -> None:
        self._epoch, self._position = self.order.check_state(state)

    def describe(self) -> str:
        """One line for the start of a run: backend, where it decodes, views, files, order."""
        where = {"reference": "Pillow in CPU workers", "torchvision": "nvJPEG on " + str(self.device)
                 if self.device.type == "cuda" else "libjpeg-turbo/libpng in CPU workers",
                 "dali": "DALI " + ("mixed on " + str(self.device) if self.device.type == "cuda" else "cpu pipeline")}
        return (f"data: backend {self.backend} [{self.chosen}] (decode: {where[self.backend]}; views: {self.views} on "
                f"{'the CPU workers' if self._views_in_workers() else self.device}), {len(self.files)} images in "
                f"{self.folder}, {len(self._listed)} listed bad, {len(self)} batches of {self.batch_size} per epoch "
                f"on rank {self.rank}/{self.world_size}")

    # -- what subclasses decide -------------------------------------------------------------------
    def _worker_decode(self):
        """What the reader workers do with a file's bytes: a picklable fn(data, name) -> uint8
        Tensor[3, H, W] or {"encoded", "orientation"}; raises DecodeError for a bad file."""
        raise NotImplementedError

    def _views_in_workers(self) -> bool:
        return False

    def _pixels(self, out: dict, bad: dict) -> tuple[list, list]:
        """(images uint8 [H, W, 3] on the device, file indices used) of a reader item, in this
        process (under the loader's CUDA stream on a GPU)."""
        images = [im.to(self.device, non_blocking=True).permute(1, 2, 0) for im in out["pixels"]]
        return images, out["indices"]

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self):
        """The batches (module docstring) of the rest of the current epoch; then the next epoch."""
        if self.order.epoch_done(self._position):
            self._epoch, self._position = self._epoch + 1, 0
        epoch = self._epoch
        slices = self.order.slices(epoch, self._position)
        in_workers = self._views_in_workers()
        reader = _Reader(self.files, self.order, self._listed, self._worker_decode(), self.spec, self.seed,
                         self.views if in_workers else None)
        items = DataLoader(reader, batch_size=None, sampler=slices, num_workers=self.num_workers,
                           pin_memory=self.pin_memory,
                           # the workers' base seed comes from this generator: the global RNG is left alone
                           generator=torch.Generator().manual_seed(stream_seed(self.seed, epoch, -2)))
        for sl, out in zip(slices, items):
            self._note_bad(out["bad"])
            batch = self._finish(sl, out)
            self._position = sl.end  # before the yield: a checkpoint taken now resumes after this batch
            yield batch
        self._epoch, self._position = epoch + 1, 0
        self._epoch_log(epoch)

    def _finish(self, sl: Slice, out: dict) -> dict:
        if "batch" in out:
            batch = out["batch"]
            for k in ("image", "global_views", "local_views"):  # pinned by the DataLoader: an async copy
                batch[k] = batch[k].to(self.device, non_blocking=True)
            indices = out["indices"]
        else:
            batch, indices = self._device_batch(sl, out)
        index = torch.tensor(indices, dtype=torch.long)
        batch["label"], batch["index"] = self.labels[index], index
        if self.pin_memory and not batch["keep"].is_pinned():
            batch["keep"] = batch["keep"].pin_memory()  # the model copies it without blocking
        return batch

    def _device_batch(self, sl: Slice, out: dict) -> tuple[dict, list]:
        bad: dict = {}
        images, indices = self._pixels(out, bad)
        self._note_bad(bad)
        return make_batch(images, SampleDraws(out["uniforms"], out["keep"]), self.spec, self.views), indices

    def _fallback(self, index: int, encoded: dict, bad: dict, reason: str):
        """(file index, CPU pixels) when a device decoder failed on file `index`: the reference
        decode of the same bytes, else the next good file (the substitution rule)."""
        path = self.files[index]
        try:
            data = encoded["encoded"].numpy().tobytes()
            return index, _decode.decode_bytes(data, path, screen=False)
        except _decode.DecodeError as e:
            bad[path] = f"{reason}; reference: {e.reason}"
        reader = _Reader(self.files, self.order, {**self._listed, **self.bad_files, **bad}, _decode.decode_bytes)
        return reader.load((index + 1) % len(self.files), bad)

    def _note_bad(self, bad: dict) -> None:
        self.bad_files.update(bad)

    def _epoch_log(self, epoch: int) -> None:
        new = len(self.bad_files) - self._reported
        if new:
            names = ", ".join(f"{Path(p).name} ({r})" for p, r in list(self.bad_files.items())[-min(new, 3):])
            log.warning("epoch %d: %d more undecodable file(s) skipped (%d in all, loader.bad_files names them): %s%s",
                        epoch, new, len(self.bad_files), names, ", ..." if new > 3 else "")
            self._reported = len(self.bad_files)
        else:
            log.info("epoch %d: done, %d undecodable file(s) skipped in all", epoch, len(self.bad_files))


class ReferenceLoader(Loader):
    """reference: Pillow decodes in DataLoader workers, which also make the views (the PyTorch
    twin by default: the oracle of the other backends); batches are pinned when the device is a
    GPU, and the views copied to it without blocking."""

    backend = "reference"
    default_views = "torch"

    def _worker_decode(self):
        return _decode.decode_bytes

    def _views_in_workers(self) -> bool:
        return True


class _SideStream:
    """The loader's own CUDA stream: decode and views run on it; the consumer's stream waits on an
    event, and every tensor handed over is recorded on the consumer's stream (so the caching
    allocator does not give its memory back to the side stream while the step still reads it)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def __enter__(self):
        self.consumer = torch.cuda.current_stream(self.device)
        # The previous batch's decode and views are finished before this one allocates: nvJPEG
        # writes on a private stream that does not wait on the caller's (pytorch/vision#9606), so
        # no block freed on the side stream may still be read by work queued there.
        self.stream.synchronize()
        self._ctx = torch.cuda.stream(self.stream)
        self._ctx.__enter__()
        return self

    def hand_over(self, batch: dict) -> dict:
        for v in batch.values():
            if isinstance(v, torch.Tensor) and v.device.type == "cuda":
                v.record_stream(self.consumer)
        return batch

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self.consumer.wait_event(self.stream.record_event())
        return False


class _DeviceLoader(Loader):
    """Shared by torchvision and dali: on a GPU, decode + views on the loader's side stream."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._side = _SideStream(self.device) if self.device.type == "cuda" else None

    def _device_batch(self, sl, out):
        if self._side is None:
            return super()._device_batch(sl, out)
        with self._side as side:
            batch, indices = super()._device_batch(sl, out)
            side.hand_over(batch)
        return batch, indices


class TorchvisionLoader(_DeviceLoader):
    """torchvision: on a GPU, the workers read and screen the files and nvJPEG decodes the JPEGs
    of a batch in one call on the loader's device (other formats: torchvision's CPU decoders in
    the workers); on the CPU, the workers decode everything with libjpeg-turbo / libpng."""

    backend = "torchvision"

    def _worker_decode(self):
        return _pass_jpeg_on if self.device.type == "cuda" else _decode.decode_bytes_torchvision

    def _pixels(self, out, bad):
        from torchvision.io import ImageReadMode, decode_jpeg

        pixels, indices = list(out["pixels"]), list(out["indices"])
        jpegs = [k for k, p in enumerate(pixels) if isinstance(p, dict)]
        decoded = {}
        if jpegs:
            data = [pixels[k]["encoded"] for k in jpegs]
            try:
                decoded = dict(zip(jpegs, decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)))
            except RuntimeError:  # the batched call fails as a whole: decode one by one
                for k, d in zip(jpegs, data):
                    try:
                        decoded[k] = decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device)
                    except RuntimeError as e:
                        indices[k], pixels[k] = self._fallback(indices[k], pixels[k], bad, f"nvJPEG: {e}")
        images = []
        for k, p in enumerate(pixels):
            if k in decoded:
                im = _decode.apply_orientation(_decode.to_rgb8(decoded[k]), p["orientation"])
            else:
                im = p.to(self.device, non_blocking=True)
            images.append(im.permute(1, 2, 0))
        return images, indices


class DaliLoader(_DeviceLoader):
    """dali: the workers read and screen the files; a DALI pipeline decodes each batch ("mixed" on
    the loader's GPU, "cpu" without one); formats it does not take are decoded in the workers."""

    backend = "dali"

    def __init__(self, *args, **kw):
        _dali.require_dali()  # the reason it does not import, and how to install it: never another backend
        super().__init__(*args, **kw)
        self._pipe = None
        self._held = None  # the DALI outputs the last batch's images live in
        self.rebuilds = 0  # pipelines rebuilt after a failed batch

    def _worker_decode(self):
        return _pass_dali_formats_on

    def _pixels(self, out, bad):
        pixels, indices = list(out["pixels"]), list(out["indices"])
        enc = [k for k, p in enumerate(pixels) if isinstance(p, dict)]
        decoded = {}
        if enc:
            if self._pipe is None:
                self._pipe = _dali.build_decoder(self.batch_size, self.device.index if self.device.type == "cuda"
                                                 else None, max(1, self.num_workers))
            stream = self._side.stream if self._side is not None else None
            try:
                images, self._held = _dali.decode_batch(self._pipe, [pixels[k]["encoded"].numpy() for k in enc], stream)
                decoded = dict(zip(enc, images))
            except RuntimeError as e:  # the batch failed; the pipeline is no longer valid
                self._pipe, self._held = None, None
                self.rebuilds += 1
                reason = "DALI: " + " ".join(str(e).split())[-160:]
                for k in enc:
                    indices[k], pixels[k] = self._fallback(indices[k], pixels[k], bad, reason)
        images = []
        for k, p in enumerate(pixels):
            if k in decoded:
                images.append(_decode.apply_orientation(decoded[k], p["orientation"], layout="HWC"))
            else:
                images.append(p.to(self.device, non_blocking=True).permute(1, 2, 0))
        return images, indices


_LOADERS = {"reference": ReferenceLoader, "torchvision": TorchvisionLoader, "dali": DaliLoader}


def build_loader(root: Optional[Union[str, Path]] = None, backend: str = "auto", batch_size: int = 32,
                 spec: Optional[ViewSpec] = None, **kw) -> Loader:
    """A multi-crop loader over `root` (None: the embedded shapes dataset).

    backend: "reference", "torchvision", "dali" (module docstring), or "auto": dali on a GPU
    where DALI imports, torchvision on a GPU, else reference (`pick_backend`).
    spec: the ViewSpec (default ViewSpec()); ViewSpec fields may be given as keywords instead
    (`build_loader(root, global_size=64, num_local=2)`), never both.
    Other keywords, the same for every backend: num_workers (reader / decode workers), seed,
    rank and world_size (default: torch.distributed's), shuffle, drop_last, split ("train":
    read root/train when it exists), device (the views' device; default this process's GPU,
    cuda:LOCAL_RANK, else the CPU), views ("op" | "torch" | "auto"; default "torch" for the
    reference, "op" otherwise), check (run `stellar data check` before the first epoch when no
    list exists), bad_list (a list written by it), pin_memory (default: on a GPU).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    fields = {k: kw.pop(k) for k in list(kw) if k in ViewSpec.__dataclass_fields__}
    if fields:
        if spec is not None:
            raise TypeError(f"build_loader got both spec and ViewSpec fields {sorted(fields)}: give one")
        spec = ViewSpec(**fields)
    known = {"num_workers", "seed", "rank", "world_size", "shuffle", "drop_last", "split", "device", "views", "check",
             "bad_list", "pin_memory"}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise TypeError(f"build_loader got unknown arguments: {unknown}")
    chosen = None
    if backend == "auto":
        backend, why = pick_backend(kw.get("device"))
        chosen = f"auto: {why}"
    loader = _LOADERS[backend](root, spec, batch_size, **kw)
    loader.chosen = chosen or f"backend={backend!r} asked for"
    return loader

"""The pretraining loop: one step is ``forward_losses`` -> ``update_without_sync`` (``train.sync_free``;
the losses are read every ``log.every`` steps) or ``forward_losses`` -> ``check_finite`` -> ``update_with_sync``.

    result = pretrain(load_config("configs/tiny.yaml"), "runs/tiny")
    result = pretrain(None, "runs/tiny", resume=True)       # continues exactly where it stopped

Outputs in the run directory: ``config.yaml`` (the merged config), ``checkpoints/`` (see
checkpoint.py), ``metrics.csv`` (one row per optimizer step), ``tb/`` (TensorBoard events),
``.lock`` while the run lives (lock.py).

Under torchrun (``torchrun --nproc_per_node N -m stellar pretrain ...``) every process runs
``pretrain``: the process group starts from torchrun's environment (distributed.py), the model is
wrapped in DDP or FSDP2 (``train.parallel``), each process reads its slice of every global batch
(``loader_fn(cfg, rank, world_size)``), and rank 0 alone writes the config, metrics,
TensorBoard, progress bar and the checkpoint's shared parts. The global batch is
``train.batch_size x world_size``; at a fixed global batch the losses and weights do not depend
on the number of processes (to float32 rounding): every loss is a mean over equal per-rank
batches, gradients are averaged over ranks, Sinkhorn-Knopp sums over all ranks, and the random
draws of a sample come with the batch.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import torch

from . import distributed
from .checkpoint import (capture_rng, checkpoint_name, latest_checkpoint, load_training_state, rank_state,
                         restore_rng, save_checkpoint, save_sharded_checkpoint)
from .config import DEFAULTS_PATH, ConfigError, merge, read_yaml, save_config
from .lock import RunLock
from .schedule import CosineSchedule
from .step import (LossTracker, Prefetcher, StepOptions, convert_fp8, first_non_finite, non_finite_message,
                   prepare_model, update_with_sync, update_without_sync)

METRICS = "metrics.csv"
CONFIG = "config.yaml"
# Parameters whose names contain one of these are not weight-decayed (besides every 0-d/1-d
# parameter: norms and biases): learned tokens and position embeddings.
NO_DECAY_KEYWORDS = ("cls_token", "sparse_tokens", "mask_token", "pos_embed", "position_embedding")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the weights were not updated with it."""


@dataclass
class RunResult:
    out_dir: Path
    step: int                      # optimizer steps completed
    checkpoint: Path | None        # the newest checkpoint
    metrics: Path
    last_losses: dict = field(default_factory=dict)
    seconds: float = 0.0


# --------------------------------------------------------------------------- building blocks

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """This process's device, always with an index for CUDA.

    ``auto``: CUDA where available, else the CPU. A CUDA device without an index is
    ``cuda:LOCAL_RANK`` under torchrun, else the current device. ``cuda:N`` under torchrun with
    several processes per machine would put them all on one GPU, and is refused.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {name!r}") from exc
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available")
    launched = distributed.launched_by_torchrun()
    if device.index is None:
        index = distributed.local_rank() if launched else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={index} but this machine shows {torch.cuda.device_count()} GPUs: "
                               f"start at most that many processes per machine (--nproc_per_node)")
        return torch.device("cuda", index)
    if launched and distributed.local_world_size() > 1:
        raise ConfigError(f"train.device={name} would put all {distributed.local_world_size()} processes of this "
                          f"machine on one GPU: use train.device=cuda (each process takes cuda:LOCAL_RANK)")
    return device


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA for ``auto``; None (fp32) on CPU or for ``fp32``."""
    if amp not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.amp must be auto, bf16 or fp32, got {amp!r}")
    if amp == "fp32" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights; and norms, biases, tokens, position embeddings (no decay)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lowered = name.lower()
        if param.ndim <= 1 or name.endswith(".bias") or any(k in lowered for k in NO_DECAY_KEYWORDS):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, train_cfg: Mapping, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over parameter_groups; ``fused``: one fused kernel per step (train.fused_adamw)."""
    groups = parameter_groups(model, train_cfg["weight_decay"])
    return torch.optim.AdamW(groups, lr=train_cfg["lr"], betas=tuple(train_cfg["betas"]),
                             **({"fused": True} if fused else {}))


def build_schedule(train_cfg: Mapping) -> CosineSchedule:
    return CosineSchedule(base_lr=train_cfg["lr"], total_steps=train_cfg["steps"],
                          warmup=train_cfg["warmup"], min_lr=train_cfg["min_lr"])


def default_model_fn(model_cfg: Mapping) -> torch.nn.Module:
    from stellar.model import build_model

    return build_model(dict(model_cfg))


def default_loader_fn(cfg: Mapping, rank: int, world_size: int):
    """Rank ``rank``'s training loader: its slice of every global batch of ``cfg["data"]`` (the
    embedded shapes set when ``data.root`` is null), with the views and kept patches of
    ``ViewSpec.from_config(cfg)`` (so ``batch["keep"]`` fits the model), decoding on this
    process's device (``train.device``). Rank 0 prints the backend it uses and where it decodes."""
    import sys

    from stellar.data import ViewSpec, build_loader

    data = cfg["data"]
    loader = build_loader(
        data["root"], backend=data["backend"], batch_size=cfg["train"]["batch_size"], spec=ViewSpec.from_config(cfg),
        num_workers=data["num_workers"], seed=cfg["seed"], rank=rank, world_size=world_size, shuffle=True,
        drop_last=True, split="train", device=pick_device(cfg["train"]["device"]), views=data.get("views"),
        bad_list=data.get("bad_list"),
    )
    if rank == 0:
        print(loader.describe(), file=sys.stderr, flush=True)
    return loader


def endless(loader) -> Iterator[dict]:
    """Batches across epochs; the loader itself tracks (epoch, batch) for its state_dict.

    The loaders of stellar.data move to the next epoch at the end of a pass; a loader that
    does not is moved with ``set_epoch``.
    """
    tracked = hasattr(loader, "state_dict") and hasattr(loader, "set_epoch")
    empty = 0
    while True:
        epoch = loader.state_dict()["epoch"] if tracked else None
        count = 0
        for batch in loader:
            count += 1
            yield batch
        # One empty pass is a loader resumed at the very end of an epoch; two in a row is an error.
        empty = empty + 1 if count == 0 else 0
        if empty == 2:
            raise RuntimeError("the training loader yielded no batch: is the dataset smaller than one batch?")
        if tracked and loader.state_dict()["epoch"] == epoch:
            loader.set_epoch(epoch + 1)


def next_batch(batches: Iterator[dict]) -> dict:
    """The next batch, drawn without moving the global torch RNG.

    A DataLoader draws its base seed from the global generator whenever an iterator starts
    (each epoch, and again after a resume): isolating those draws keeps the model's random
    stream (masking) the same in a resumed run as in an uninterrupted one.
    """
    with torch.random.fork_rng(devices=[]):
        return next(batches)


# --------------------------------------------------------------------------- the step

def forward_losses(model: torch.nn.Module, batch: Mapping, amp_dtype: torch.dtype | None) -> dict:
    """The model's training forward under autocast (bf16 on CUDA) or in fp32, on the device of
    ``batch["image"]`` (``keep`` and the other HOST_KEYS of step.py stay on the host)."""
    device_type = batch["image"].device.type
    ctx = torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with ctx:
        return model(batch)


def loss_values(out: Mapping) -> dict[str, float]:
    """``{"loss": total, name: value, ...}`` as Python floats (averaged over ranks).

    This is the step's one host-device synchronisation: the values are logged every step and a
    non-finite total must stop the run before the update.
    """
    names = list(out["losses"])
    vec = torch.stack([out["loss"].detach().float().reshape(())] +
                      [torch.as_tensor(out["losses"][n], dtype=torch.float32, device=out["loss"].device).detach().reshape(())
                       for n in names])
    vec = distributed.mean_across_ranks(vec).cpu().tolist()   # sync
    return dict(zip(["loss", *names], vec))


def check_finite(step: int, values: Mapping[str, float], last_checkpoint: Path | None) -> None:
    """Raise ``NonFiniteLossError`` naming the step and every loss if the total is not finite."""
    if not math.isfinite(values["loss"]):
        raise NonFiniteLossError(non_finite_message(step, values, last_checkpoint))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# --------------------------------------------------------------------------- logging

class MetricsLog:
    """``DIR/metrics.csv``: step, loss, each named loss, lr, img_per_s; appended and flushed per row."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.header: list[str] | None = None
        if resume_step is not None and path.is_file():
            self._truncate(resume_step)
        elif path.exists():
            path.unlink()
        self.file = open(path, "a", newline="")
        self.writer = csv.writer(self.file)

    def _truncate(self, step: int) -> None:
        """Keep only the rows of steps <= ``step`` (the steps the resumed checkpoint contains)."""
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        self.header = rows[0]
        kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)
        os.replace(tmp, self.path)

    def write(self, step: int, values: Mapping[str, float], lr: float, img_per_s: float) -> None:
        if self.header is None:
            self.header = ["step", *values.keys(), "lr", "img_per_s"]
            self.writer.writerow(self.header)
        row = {"step": step, **values, "lr": lr, "img_per_s": img_per_s}
        self.writer.writerow([_fmt(row.get(k, "")) for k in self.header])
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _fmt(value) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.csv as dicts of floats (``step`` as int)."""
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "step" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def open_tensorboard(out_dir: Path, resume_step: int | None):
    from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when logging

    purge = resume_step + 1 if resume_step is not None else None
    return SummaryWriter(str(out_dir / "tb"), purge_step=purge, flush_secs=10)


# --------------------------------------------------------------------------- the run

def saved_config(out_dir: Path) -> dict:
    """The config a run saved, over today's defaults (keys added since are filled in)."""
    if not (out_dir / CONFIG).is_file():
        raise FileNotFoundError(f"cannot resume: {out_dir / CONFIG} not found")
    return merge(read_yaml(DEFAULTS_PATH), read_yaml(out_dir / CONFIG))


def prepare_run_dir(out_dir: Path, cfg: Mapping | None, resume: bool) -> dict:
    """Create the run directory and save the merged config; on resume read it back instead."""
    if resume:
        saved = saved_config(out_dir)
        if cfg is not None and dict(cfg) != saved:
            save_config(cfg, out_dir / CONFIG)     # resumed with overrides (e.g. more steps)
            return dict(cfg)
        return saved
    if cfg is None:
        raise ValueError("cfg is required for a new run")
    if latest_checkpoint(out_dir) is not None:
        raise FileExistsError(f"{out_dir} already holds a run: resume it with --resume {out_dir} "
                              f"or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / CONFIG)
    return dict(cfg)


def open_run(lock: RunLock, out_dir: Path, cfg: Mapping | None, resume: bool) -> tuple[dict, bool]:
    """Rank 0: take the run directory's lock, then create or read the run. Returns (config, resume).

    A worker restarted by torchrun (``--max-restarts``) continues from the last checkpoint when
    there is one, as ``--resume`` would.
    """
    lock.acquire()
    if not resume and distributed.restart_count() > 0 and latest_checkpoint(out_dir) is not None:
        resume = True
    return prepare_run_dir(out_dir, cfg, resume), resume


def check_train_config(train: Mapping) -> None:
    if train["parallel"] not in distributed.PARALLEL:
        raise ConfigError(f"train.parallel must be one of {distributed.PARALLEL}, got {train['parallel']!r}")
    timeout = train["dist_timeout_s"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"train.dist_timeout_s must be a positive number of seconds, got {timeout!r}")


def pretrain(
    cfg: Mapping | None,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    model_fn: Callable[[Mapping], torch.nn.Module] = default_model_fn,
    loader_fn: Callable[[Mapping, int, int], object] = default_loader_fn,
) -> RunResult:
    """Pretrain for ``cfg["train"]["steps"]`` optimizer steps, or continue a run with ``resume``.

    ``stop_after`` ends this process after that many completed steps (with a checkpoint), as if
    interrupted; the schedule still spans ``train.steps``. ``model_fn(cfg["model"])`` and
    ``loader_fn(cfg, rank, world_size)`` build the model and the loader (tests substitute them);
    the loader of rank r yields rank r's slice of each global batch.
    Under torchrun every process calls this; it starts and ends the process group itself.
    Raises ``NonFiniteLossError`` if the loss stops being finite, ``RunLockedError`` if a live
    run holds ``out_dir``, ``RankLostError`` (naming the rank) if another process of the run dies.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    if cfg is None and not resume:
        raise ValueError("cfg is required for a new run")
    if cfg is not None:
        cfg = merge(read_yaml(DEFAULTS_PATH), cfg)     # keys added to the defaults since cfg was made
    launch = cfg if cfg is not None else saved_config(out_dir)
    check_train_config(launch["train"])
    device = pick_device(launch["train"]["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with distributed.process_group(device, launch["train"]["dist_timeout_s"]):
        lock = RunLock(out_dir)
        try:
            cfg, resume = distributed.run_on_main(lambda: open_run(lock, out_dir, cfg, resume))
            return run_training(cfg, out_dir, device, resume, stop_after, model_fn, loader_fn, t_start)
        except RuntimeError as exc:
            if isinstance(exc, NonFiniteLossError) or not distributed.initialized():
                raise
            last = latest_checkpoint(out_dir)
            lost = distributed.explain_failure(
                exc, hint=f"The last checkpoint is {last}; continue with --resume {out_dir}." if last else
                "No checkpoint was written yet.")
            if lost is exc:
                raise
            raise lost from exc
        finally:
            lock.release()


def run_training(cfg: dict, out_dir: Path, device: torch.device, resume: bool, stop_after: int | None,
                 model_fn: Callable, loader_fn: Callable, t_start: float) -> RunResult:
    """Build (or restore) model, optimizer, schedule and loader, then run the steps."""
    train = cfg["train"]
    check_train_config(train)
    total = int(train["steps"])
    amp_dtype = autocast_dtype(train["amp"], device)
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0

    seed = int(cfg["seed"])
    seed_everything(seed)                  # the same initial weights on every rank, for every world size
    model = model_fn(cfg["model"]).to(device)
    if rank:
        seed_everything(seed + rank)       # rank 0 goes on with a one-process run's stream
    opts = StepOptions.from_config(train, device, log_every=int(cfg["log"].get("every", 10)))
    if opts.fp8:
        convert_fp8(model)                 # before DDP/FSDP see the modules
    model = distributed.wrap_model(model, device, train["parallel"],
                                   param_dtype=amp_dtype if device.type == "cuda" else None)
    core = getattr(model, "module", model)              # DDP's module; FSDP2 shards the model in place
    prepare_model(core, replace(opts, fp8=False))       # torch.compile of the pieces
    ema = getattr(core, "teacher", None) is not None
    optimizer = build_optimizer(model, train, fused=opts.fused_adamw)
    schedule = build_schedule(train)
    loader = loader_fn(cfg, rank, world)
    images_per_step = int(train["batch_size"]) * world

    start, checkpoint = 0, None
    if resume:
        checkpoint = latest_checkpoint(out_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"cannot resume: no checkpoint in {out_dir}")
        start = restore(checkpoint, model, optimizer, loader, images_per_step)
    model.train()

    metrics = MetricsLog(out_dir / METRICS, start if resume else None) if main else None
    tb = open_tensorboard(out_dir, start if resume else None) if main and cfg["log"]["tensorboard"] else None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
               disable=not (main and cfg["log"]["progress"]))
    every = int(train["checkpoint_every"])
    end = total if stop_after is None else min(total, int(stop_after))
    values: dict = {}

    def save(step: int) -> Path:
        shared = {"schedule": schedule.state_dict(), "world_size": world, "global_batch": images_per_step,
                  "parallel": train["parallel"] if distributed.initialized() else None}
        return save_run_checkpoint(out_dir, step, model, optimizer, position, shared, cfg,
                                   keep=int(train["keep_checkpoints"]))

    batches = endless(loader)
    feed = Prefetcher(lambda: next_batch(batches), device, enabled=opts.prefetch,
                      state=loader.state_dict if hasattr(loader, "state_dict") else None)
    position = _Position(feed) if opts.prefetch and hasattr(loader, "state_dict") else loader
    tracker = LossTracker(None, opts.log_every, device) if opts.sync_free else None
    lrs: dict[int, float] = {}
    t_read = time.perf_counter()
    step = start
    try:
        while step < end:
            t0 = time.perf_counter()
            lr = schedule(step)
            set_lr(optimizer, lr)
            batch = feed.next()
            if opts.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            if tracker is None:
                values = train_step(model, optimizer, batch, amp_dtype, train["grad_clip"], step + 1, checkpoint)
            else:                          # no host read: the losses stay on the device until read_losses
                out = forward_losses(model, batch, amp_dtype)
                norm, _ = update_without_sync(out["loss"], optimizer, train["grad_clip"])
                tracker.add(step + 1, out, norm)
                lrs[step + 1] = lr
                del out
            if ema:                        # after the optimizer step: the next forward's targets see it
                core.update_teacher()
            step += 1
            save_now = step % every == 0 or step == end
            if tracker is None:
                if main:
                    img_per_s = images_per_step / max(time.perf_counter() - t0, 1e-9)
                    log_step(metrics, tb, bar, step, values, lr, img_per_s)
            elif tracker.full or save_now:
                # The loop's one synchronisation, every log.every steps and before every checkpoint:
                # a non-finite step stops the run here, before anything after it is saved.
                values = read_losses(tracker, lrs, metrics, tb, bar, images_per_step, t_read, checkpoint, step)
                t_read = time.perf_counter()
            if save_now:
                checkpoint = save(step)
    finally:
        if tracker is not None and len(tracker) and not distributed.initialized():
            # Interrupted between reads: log the steps that completed (one process: no collective to hang on).
            with contextlib.suppress(NonFiniteLossError):
                read_losses(tracker, lrs, metrics, tb, bar, images_per_step, t_read, checkpoint, step)
        bar.close()
        if metrics is not None:
            metrics.close()
        if tb is not None:
            tb.close()
    return RunResult(out_dir=out_dir, step=step, checkpoint=checkpoint, metrics=out_dir / METRICS,
                     last_losses=values, seconds=time.perf_counter() - t_start)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping,
               amp_dtype: torch.dtype | None, grad_clip: float | None, step: int,
               last_checkpoint: Path | None) -> dict[str, float]:
    """One optimizer step on this rank's slice of the global batch; the losses averaged over ranks."""
    out = forward_losses(model, batch, amp_dtype)
    values = loss_values(out)
    check_finite(step, values, last_checkpoint)
    update_with_sync(out["loss"], optimizer, grad_clip)
    return values


def read_losses(tracker: LossTracker, lrs: dict, metrics, tb, bar, images_per_step: int, t_read: float,
                last_checkpoint: Path | None, step: int) -> dict[str, float]:
    """train.sync_free: read the tracked steps' losses (one host copy, averaged over ranks), log
    each step, and raise ``NonFiniteLossError`` at the first step whose loss or gradient norm is
    not finite (its update was skipped on the device), after logging the steps before it."""
    rows = tracker.read()
    bad = first_non_finite(rows, tracker.last_norms)
    good = rows if bad is None else rows[:bad]
    img_per_s = images_per_step * len(rows) / max(time.perf_counter() - t_read, 1e-9)
    if metrics is not None:
        for s, values in good:
            log_step(metrics, tb, bar, s, values, lrs.pop(s, float("nan")), img_per_s)
    lrs.clear()
    if bad is not None:
        s, values = rows[bad]
        raise NonFiniteLossError(non_finite_message(s, values, last_checkpoint, norm=tracker.last_norms[bad],
                                                    stopped_at=step, skipped=True))
    return dict(rows[-1][1]) if rows else {}


class _Position:
    """The loader position of the batches handed out, for checkpoints while a batch is prefetched."""

    def __init__(self, feed: Prefetcher):
        self.feed = feed

    def state_dict(self):
        return self.feed.state()


def log_step(metrics: "MetricsLog", tb, bar, step: int, values: Mapping[str, float], lr: float,
             img_per_s: float) -> None:
    """Rank 0: a metrics.csv row, TensorBoard scalars, the progress bar."""
    metrics.write(step, values, lr, img_per_s)
    if tb is not None:
        for name, v in values.items():
            tb.add_scalar(f"loss/{name}", v, step)
        tb.add_scalar("lr", lr, step)
        tb.add_scalar("img_per_s", img_per_s, step)
    bar.update(1)
    bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{img_per_s:.0f}", refresh=False)


def save_run_checkpoint(out_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        loader, shared: Mapping, cfg: Mapping, keep: int) -> Path:
    """Every rank: the checkpoint of ``step``, with each rank's own RNG state and loader position.

    The per-rank parts are gathered on rank 0 (``state["ranks"][r]``). FSDP2: every rank writes
    its shards (``save_sharded_checkpoint``); otherwise rank 0 writes the weights and optimizer.
    """
    mine = {"rng": capture_rng(), "loader": loader.state_dict() if hasattr(loader, "state_dict") else None}
    state = {**shared, "ranks": distributed.gather_to_main(mine)}
    if distributed.is_sharded(model):
        return save_sharded_checkpoint(out_dir, step, model, optimizer, state, cfg, keep=keep)
    path = out_dir / "checkpoints" / checkpoint_name(step)
    if distributed.is_main():
        path = save_checkpoint(out_dir, step, model, {**state, "optimizer": optimizer.state_dict()}, cfg, keep=keep)
    distributed.barrier()
    return path


def restore(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader,
            images_per_step: int) -> int:
    """Every rank: load a checkpoint for ``--resume``; returns its step.

    Rank r takes its own RNG state and loader position. Saved by N processes and resumed by M:
    ranks >= N start fresh RNG streams and take rank 0's loader position. With the loaders'
    global sample order the position (the samples of the epoch handed out by all ranks together)
    is the same on every rank: with the same global batch (``world_size x train.batch_size``)
    the resumed run reads the same images in the same batches whatever M is.
    """
    state = load_training_state(checkpoint, model, optimizer)
    rank = distributed.rank()
    mine = rank_state(state, rank)
    position = (mine or rank_state(state, 0) or {}).get("loader")
    if position is not None and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(position)
    if mine is not None and mine.get("rng") is not None:
        restore_rng(mine["rng"])
    saved_world, saved_batch = state.get("world_size", 1), state.get("global_batch", images_per_step)
    if distributed.is_main() and (saved_world != distributed.world_size() or saved_batch != images_per_step):
        warnings.warn(f"resuming {checkpoint} (written by {saved_world} processes, global batch {saved_batch}) on "
                      f"{distributed.world_size()} processes with global batch {images_per_step}: the loader "
                      f"continues from the saved position in the epoch's sample order, "
                      + ("the same images as before." if saved_batch == images_per_step else
                         "grouped into batches of another size: not what an uninterrupted run would see."),
                      RuntimeWarning, stacklevel=2)
    return int(state["step"])

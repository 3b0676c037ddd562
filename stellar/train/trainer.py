"""The pretraining loop: one step is ``forward_losses`` -> ``check_finite`` -> ``backward_and_update``.

    result = pretrain(load_config("configs/tiny.yaml"), "runs/tiny")
    result = pretrain(None, "runs/tiny", resume=True)       # continues exactly where it stopped

Outputs in the run directory: ``config.yaml`` (the merged config), ``checkpoints/`` (see
checkpoint.py), ``metrics.csv`` (one row per optimizer step), ``tb/`` (TensorBoard events).
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import torch

from . import distributed
from .checkpoint import (capture_rng, latest_checkpoint, load_state, load_weights, restore_rng,
                         save_checkpoint)
from .config import read_yaml, save_config
from .schedule import CosineSchedule

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
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available")
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


def build_optimizer(model: torch.nn.Module, train_cfg: Mapping) -> torch.optim.Optimizer:
    groups = parameter_groups(model, train_cfg["weight_decay"])
    return torch.optim.AdamW(groups, lr=train_cfg["lr"], betas=tuple(train_cfg["betas"]))


def build_schedule(train_cfg: Mapping) -> CosineSchedule:
    return CosineSchedule(base_lr=train_cfg["lr"], total_steps=train_cfg["steps"],
                          warmup=train_cfg["warmup"], min_lr=train_cfg["min_lr"])


def default_model_fn(model_cfg: Mapping) -> torch.nn.Module:
    from stellar.model import build_model

    return build_model(dict(model_cfg))


def default_loader_fn(cfg: Mapping, rank: int, world_size: int):
    """The training loader of ``cfg["data"]`` (the embedded shapes set when ``data.root`` is null)."""
    from stellar.data import build_loader

    data = cfg["data"]
    root = data["root"]
    if root is None:
        from stellar.data.shapes import ensure_shapes_dataset

        root = ensure_shapes_dataset()
    return build_loader(
        root, backend=data["backend"], batch_size=cfg["train"]["batch_size"],
        num_workers=data["num_workers"], global_size=data["global_size"], local_size=data["local_size"],
        num_global=data["num_global"], num_local=data["num_local"],
        global_scale=tuple(data["global_scale"]), local_scale=tuple(data["local_scale"]),
        seed=cfg["seed"], rank=rank, world_size=world_size, shuffle=True, drop_last=True, split="train",
    )


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


def to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# --------------------------------------------------------------------------- the step

def forward_losses(model: torch.nn.Module, batch: Mapping, amp_dtype: torch.dtype | None) -> dict:
    """The model's training forward under autocast (bf16 on CUDA) or in fp32."""
    device_type = next(iter(v for v in batch.values() if torch.is_tensor(v))).device.type
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
    if math.isfinite(values["loss"]):
        return
    parts = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
    where = (f"the last good checkpoint is {last_checkpoint} (resume with: stellar pretrain --resume "
             f"{last_checkpoint.parent.parent})" if last_checkpoint else "no checkpoint was written before it")
    raise NonFiniteLossError(f"non-finite loss at step {step}: {parts}. Stopped before updating the "
                             f"weights; {where}.")


def backward_and_update(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        grad_clip: float | None) -> float:
    """Backward, clip the global gradient norm, AdamW step. Returns the pre-clip norm (a tensor on device)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = torch.zeros(())
    optimizer.step()
    return norm


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

def prepare_run_dir(out_dir: Path, cfg: Mapping | None, resume: bool) -> dict:
    """Create the run directory and save the merged config; on resume read it back instead."""
    if resume:
        if not (out_dir / CONFIG).is_file():
            raise FileNotFoundError(f"cannot resume: {out_dir / CONFIG} not found")
        saved = read_yaml(out_dir / CONFIG)
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
    ``loader_fn(cfg, rank, world_size)`` build the model and the loader (tests substitute them).
    Raises ``NonFiniteLossError`` if the loss stops being finite.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    main = distributed.is_main()
    cfg = prepare_run_dir(out_dir, cfg, resume) if main else dict(cfg or read_yaml(out_dir / CONFIG))
    train = cfg["train"]
    total = int(train["steps"])
    device = pick_device(train["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    amp_dtype = autocast_dtype(train["amp"], device)

    seed_everything(int(cfg["seed"]) + distributed.rank())
    model = model_fn(cfg["model"]).to(device)
    optimizer = build_optimizer(model, train)
    schedule = build_schedule(train)
    loader = loader_fn(cfg, distributed.rank(), distributed.world_size())

    start, checkpoint = 0, None
    if resume:
        checkpoint = latest_checkpoint(out_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"cannot resume: no checkpoint in {out_dir}")
        state = load_state(checkpoint)
        load_weights(checkpoint, model)
        optimizer.load_state_dict(state["optimizer"])
        if state.get("loader") is not None and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(state["loader"])
        restore_rng(state["rng"])
        start = int(state["step"])
    model = distributed.wrap_model(model, device)
    model.train()

    metrics = MetricsLog(out_dir / METRICS, start if resume else None) if main else None
    tb = open_tensorboard(out_dir, start if resume else None) if main and cfg["log"]["tensorboard"] else None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
               disable=not (main and cfg["log"]["progress"]))
    images_per_step = int(train["batch_size"]) * distributed.world_size()
    every = int(train["checkpoint_every"])
    end = total if stop_after is None else min(total, int(stop_after))
    values: dict = {}

    def save(step: int) -> Path | None:
        if not main:
            return checkpoint
        state = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                 "rng": capture_rng(), "loader": loader.state_dict() if hasattr(loader, "state_dict") else None}
        return save_checkpoint(out_dir, step, model, state, cfg, keep=int(train["keep_checkpoints"]))

    batches = endless(loader)
    step = start
    try:
        while step < end:
            t0 = time.perf_counter()
            lr = schedule(step)
            set_lr(optimizer, lr)
            batch = to_device(next_batch(batches), device)
            out = forward_losses(model, batch, amp_dtype)
            values = loss_values(out)
            check_finite(step + 1, values, checkpoint)
            backward_and_update(out["loss"], model, optimizer, train["grad_clip"])
            step += 1
            img_per_s = images_per_step / max(time.perf_counter() - t0, 1e-9)
            if main:
                metrics.write(step, values, lr, img_per_s)
                if tb is not None:
                    for name, v in values.items():
                        tb.add_scalar(f"loss/{name}", v, step)
                    tb.add_scalar("lr", lr, step)
                    tb.add_scalar("img_per_s", img_per_s, step)
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{img_per_s:.0f}", refresh=False)
            if step % every == 0 or step == end:
                checkpoint = save(step)
                distributed.barrier()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
        if tb is not None:
            tb.close()
    return RunResult(out_dir=out_dir, step=step, checkpoint=checkpoint, metrics=out_dir / METRICS,
                     last_losses=values, seconds=time.perf_counter() - t_start)

"""The training step's speed levers (issue 8), each switched by a `train:` config key.

    opts = StepOptions.from_config(cfg["train"], device)       # resolves the "auto"s for the device
    model = prepare_model(model, opts)                           # fp8 linears, torch.compile of the pieces
    optimizer = build_optimizer(model, cfg["train"], opts)       # fused AdamW where opts.fused_adamw
    tracker = LossTracker(LOSS_NAMES, opts.log_every, device)    # the losses stay on the device
    ...
    out = trainer.forward_losses(model, batch, amp_dtype)
    norm, found_inf = update_without_sync(out["loss"], optimizer, grad_clip)   # skips a non-finite update
    tracker.add(step, out, norm)
    if tracker.full or checkpoint_due:
        rows = tracker.read()                                    # the one host read, every log.every steps

| key | what | on |
| --- | --- | --- |
| train.compile | torch.compile of the ViT blocks, each view group's embedding and the loss pieces, static shapes (`Stellar.compile_pieces`) | false |
| train.compile_backend | inductor (GPU) or aot_eager (tests) | inductor |
| train.cuda_graphs | compile mode "reduce-overhead" (CUDA graphs of the compiled pieces); CUDA only, needs compile | false |
| train.sync_free | no host read in the hot loop: losses accumulate on the device and are read every log.every steps; a non-finite loss or gradient norm skips the update on the device (fused AdamW's found_inf) and stops the run at the next read, naming the step | true |
| train.fused_adamw | AdamW(fused=True) (CUDA and CPU kernels); auto = on | auto |
| train.fp8 | torchao float8 training for the ViT blocks' linears; CUDA with compute capability >= 8.9 only | false |
| train.prefetch | the next batch fetched and copied on a side CUDA stream while the step runs; auto = on CUDA | auto |

The model's own levers are `model.pack_views`, `model.attention`, `model.clustering.fused` and
`model.residual_bf16` (stellar/model/stellar.py). Every host-device synchronisation left in a
step is commented where it happens.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["StepOptions", "prepare_model", "build_optimizer", "update_with_sync",
           "update_without_sync", "LossTracker", "Prefetcher", "to_device", "HOST_KEYS", "fp8_modules",
           "convert_fp8", "non_finite_message", "STEP_KEYS"]

# train.* keys of this module, with their defaults (stellar/train/defaults.yaml lists the same).
STEP_KEYS = {"compile": False, "compile_backend": "inductor", "cuda_graphs": False, "sync_free": True,
             "fused_adamw": "auto", "fp8": False, "prefetch": "auto"}


def _flag(cfg: Mapping, key: str, auto: bool) -> bool:
    value = cfg.get(key, STEP_KEYS[key])
    if value == "auto":
        return auto
    if not isinstance(value, bool):
        raise ValueError(f"train.{key} must be true, false or auto, got {value!r}")
    return value


@dataclass(frozen=True)
class StepOptions:
    """The resolved levers for one device (see the module docstring)."""
    compile: bool = False
    compile_backend: str = "inductor"
    cuda_graphs: bool = False
    sync_free: bool = False
    fused_adamw: bool = False
    fp8: bool = False
    prefetch: bool = False
    log_every: int = 1
    device_type: str = "cpu"

    @classmethod
    def from_config(cls, train: Mapping, device: torch.device, log_every: int = 10) -> "StepOptions":
        """Read train.* (missing keys take STEP_KEYS' defaults); clear errors for impossible mixes."""
        cuda = device.type == "cuda"
        opts = cls(
            compile=_flag(train, "compile", False),
            compile_backend=str(train.get("compile_backend", STEP_KEYS["compile_backend"])),
            cuda_graphs=_flag(train, "cuda_graphs", False),
            sync_free=_flag(train, "sync_free", True),
            fused_adamw=_flag(train, "fused_adamw", True),
            fp8=_flag(train, "fp8", False),
            prefetch=_flag(train, "prefetch", cuda),
            log_every=int(log_every),
            device_type=device.type,
        )
        if opts.log_every < 1:
            raise ValueError(f"log.every must be >= 1, got {log_every}")
        if opts.cuda_graphs and not cuda:
            raise ValueError(f"train.cuda_graphs needs a CUDA device, got {device}")
        if opts.cuda_graphs and not opts.compile:
            raise ValueError("train.cuda_graphs runs the compiled pieces as CUDA graphs: set train.compile=true too")
        if opts.sync_free and not opts.fused_adamw:
            raise ValueError("train.sync_free skips a non-finite update on the device through fused AdamW's "
                             "found_inf: set train.fused_adamw=true (or auto), or train.sync_free=false")
        if opts.prefetch and not cuda:
            raise ValueError(f"train.prefetch=true needs a CUDA device (a side stream), got {device}; use auto")
        if opts.fp8:
            _check_fp8_device(device)
        return opts


# --------------------------------------------------------------------------- the model

def prepare_model(model: torch.nn.Module, opts: StepOptions) -> torch.nn.Module:
    """Apply the model-side levers in place: fp8 linears, then torch.compile of the step's pieces."""
    if opts.fp8:
        convert_fp8(model)
    if opts.compile:
        if not hasattr(model, "compile_pieces"):
            raise TypeError(f"train.compile needs a model with compile_pieces() (stellar.model.Stellar), "
                            f"got {type(model).__name__}")
        kwargs: dict[str, Any] = {"backend": opts.compile_backend}
        if opts.cuda_graphs:
            kwargs["mode"] = "reduce-overhead"
        model.compile_pieces(**kwargs)
    return model


def fp8_modules(model: torch.nn.Module) -> list[str]:
    """Names of the linears that train.fp8 converts: those inside the ViT blocks (encoder and
    decoder: qkv, proj, fc1, fc2) with both sizes multiples of 16 (float8 GEMMs need it). The
    clustering heads (their prototypes feed a temperature-0.06 softmax), the factorization
    projections and patch embedding stay in bf16."""
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".blocks." in f".{name}"
            and m.in_features % 16 == 0 and m.out_features % 16 == 0]


def _check_fp8_device(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"train.fp8 trains the ViT linears with float8 matrix products, which need a CUDA GPU "
                         f"with compute capability >= 8.9 (Ada, Hopper); this run is on {device}. "
                         "Set train.fp8=false.")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ValueError(f"train.fp8 needs compute capability >= 8.9 (Ada, Hopper), "
                         f"{torch.cuda.get_device_name(device)} has {major}.{minor}. Set train.fp8=false.")


def convert_fp8(model: torch.nn.Module) -> torch.nn.Module:
    """Swap the linears of ``fp8_modules`` for torchao's Float8Linear (dynamic tensorwise scaling).

    The model must already be on its CUDA device; CPU refuses with a clear error."""
    device = next(model.parameters()).device
    _check_fp8_device(device)
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as exc:
        raise RuntimeError(f"train.fp8 needs torchao (pip install 'stellar[fp8]', torchao >= 0.12): {exc}") from exc
    chosen = set(fp8_modules(model))
    if not chosen:
        raise ValueError("train.fp8: no linear of the ViT blocks has sizes that are multiples of 16")
    convert_to_float8_training(model, module_filter_fn=lambda module, name: name in chosen)
    return model


# --------------------------------------------------------------------------- the optimizer

def build_optimizer(model: torch.nn.Module, train: Mapping, opts: StepOptions) -> torch.optim.Optimizer:
    """AdamW over the decay / no-decay groups of trainer.parameter_groups; fused where opts says."""
    from .trainer import build_optimizer as adamw

    return adamw(model, train, fused=opts.fused_adamw)


# --------------------------------------------------------------------------- the step

def _params_with_grad(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


def update_with_sync(loss: Tensor, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> Tensor:
    """The reference update: backward, clip_grad_norm_, AdamW step (whatever AdamW was built).
    Returns the pre-clip gradient norm (a device tensor). The caller checked the loss on the host."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = _params_with_grad(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip else torch.zeros((), device=loss.device)
    optimizer.step()
    return norm


def update_without_sync(loss: Tensor, optimizer: torch.optim.Optimizer,
                        grad_clip: float | None) -> tuple[Tensor, Tensor]:
    """Backward, clip and AdamW step without one host read.

    found_inf = (loss or the global gradient norm is not finite), computed on the device (and
    MAX-reduced over ranks, an asynchronous collective, so every rank skips together); fused
    AdamW reads it and leaves weights, moments and step counts untouched for that step. The clip
    multiplies by min(1, clip / norm) on the device. Returns (pre-clip norm, found_inf), device
    tensors for the LossTracker. Needs AdamW(fused=True).
    """
    if not optimizer.defaults.get("fused"):
        raise ValueError("update_without_sync needs an optimizer built with fused=True (train.fused_adamw)")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = _params_with_grad(optimizer)
    if not params:
        norm = torch.zeros((), device=loss.device)
    elif grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)      # foreach: no host read
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if hasattr(norm, "full_tensor"):                                 # FSDP2: a DTensor
        norm = norm.full_tensor()
    found_inf = (~torch.isfinite(loss.detach()) | ~torch.isfinite(norm)).float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)             # asynchronous: every rank skips together
    optimizer.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        optimizer.found_inf = None
    return norm, found_inf


# --------------------------------------------------------------------------- losses on the device

class LossTracker:
    """Per-step losses kept on the device, read to the host ``capacity`` steps at a time.

    names: the loss names (out["losses"] keys) or None to take them from the first step.

    add(step, out, norm) copies the step's total, named losses and gradient norm into a
    preallocated device buffer (no host read); read() moves the buffer to the host in one copy
    (the step's one synchronisation, every log.every steps), averaged over ranks, and returns
    [(step, {"loss": ..., name: ..., }), ...] in order with the norms in ``last_norms``.
    """

    def __init__(self, names: Sequence[str] | None, capacity: int, device: torch.device) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self.device = capacity, device
        self.names: list[str] = []
        self.values = self.norms = None
        if names is not None:
            self._allocate(names)
        self.steps: list[int] = []
        self.last_norms: list[float] = []

    def _allocate(self, names: Sequence[str]) -> None:
        self.names = ["loss", *names]
        self.values = torch.zeros(self.capacity, len(self.names), device=self.device)
        self.norms = torch.zeros(self.capacity, device=self.device)

    @property
    def full(self) -> bool:
        return len(self.steps) >= self.capacity

    def __len__(self) -> int:
        return len(self.steps)

    def add(self, step: int, out: Mapping, norm: Tensor | None = None) -> None:
        if self.full:
            raise RuntimeError(f"LossTracker holds {self.capacity} steps already: read() it first")
        i = len(self.steps)
        losses = out["losses"]
        if self.values is None:                                      # names from the first step's output
            self._allocate(list(losses))
        row = torch.stack([out["loss"].detach().float().reshape(())] +
                          [losses[n].detach().float().reshape(()) for n in self.names[1:]])
        self.values[i].copy_(row)
        if norm is not None:
            self.norms[i].copy_(norm.detach().float())
        self.steps.append(step)

    def read(self) -> list[tuple[int, dict[str, float]]]:
        if not self.steps:
            return []
        n = len(self.steps)
        values = self.values[:n]
        if dist.is_available() and dist.is_initialized():
            from . import distributed
            values = distributed.mean_across_ranks(values)
        host = torch.cat([values, self.norms[:n, None]], dim=1).cpu().tolist()   # sync: the read
        rows = [(step, dict(zip(self.names, r[:-1]))) for step, r in zip(self.steps, host)]
        self.last_norms = [r[-1] for r in host]
        self.steps = []
        return rows


def first_non_finite(rows: Sequence[tuple[int, Mapping[str, float]]],
                     norms: Sequence[float] | None = None) -> int | None:
    """Index of the first row whose total loss (or gradient norm) is not finite, else None."""
    for i, (_, values) in enumerate(rows):
        if not math.isfinite(values["loss"]) or (norms is not None and not math.isfinite(norms[i])):
            return i
    return None


def non_finite_message(step: int, values: Mapping[str, float], last_checkpoint, *, norm: float | None = None,
                       stopped_at: int | None = None, skipped: bool = False) -> str:
    """The NonFiniteLossError text: the step, every loss, what happened to the weights, where to resume."""
    parts = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
    if norm is not None and not math.isfinite(norm):
        parts += f", grad_norm={norm:.6g}"
    where = (f"the last good checkpoint is {last_checkpoint} (resume with: stellar pretrain --resume "
             f"{last_checkpoint.parent.parent})" if last_checkpoint else "no checkpoint was written before it")
    if not skipped:
        happened = "Stopped before updating the weights"
    else:
        happened = (f"That step's update was skipped on the device (the weights never saw it); the run stopped "
                    f"at step {stopped_at if stopped_at is not None else step}, when the losses were read, "
                    f"before writing any checkpoint past step {step - 1}")
    return f"non-finite loss at step {step}: {parts}. {happened}; {where}."


# --------------------------------------------------------------------------- input

# Batch keys that stay where the loader put them (the host): the step does not compute on them.
# `keep` is range-checked by the model on the host and copied by it without blocking (the
# loaders pin it on a GPU); `crops`, `index` and `label` are not read by the step.
HOST_KEYS = frozenset({"keep", "crops", "index", "label"})


def to_device(batch: Mapping, device: torch.device) -> dict:
    """The batch with its tensors on ``device`` (non_blocking), except HOST_KEYS."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) and k not in HOST_KEYS else v
            for k, v in batch.items()}


class Prefetcher:
    """Batches on ``device`` (``to_device``); with ``enabled`` (CUDA) the next batch is fetched and
    copied on a side stream while the current step runs.

    fetch(): the next host (or device) batch dict. state(): the loader's position *before* a
    fetch, so that ``state()`` of the prefetcher is the position after the batches handed out
    (checkpoints must not count the batch still in flight).
    """

    def __init__(self, fetch: Callable[[], Mapping], device: torch.device, enabled: bool = False,
                 state: Callable[[], Any] | None = None) -> None:
        if enabled and device.type != "cuda":
            raise ValueError(f"prefetching on a side stream needs a CUDA device, got {device}")
        self.fetch, self.device, self.enabled, self._state_fn = fetch, device, enabled, state
        self.stream = torch.cuda.Stream(device) if enabled else None
        self._next: dict | None = None
        self._next_state = None

    def _load(self) -> None:
        self._next_state = self._state_fn() if self._state_fn is not None else None
        with torch.cuda.stream(self.stream):
            self._next = to_device(self.fetch(), self.device)

    def next(self) -> dict:
        if not self.enabled:
            return to_device(self.fetch(), self.device)
        if self._next is None:
            self._load()
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)                 # device-side wait, no host sync
        batch = self._next
        for v in batch.values():
            if torch.is_tensor(v) and v.device.type == "cuda":
                v.record_stream(current)                 # its memory belongs to the step's stream now
        self._next = None
        self._load()                                     # the next one overlaps this step
        return batch

    def state(self):
        """The loader position after the batches handed out so far."""
        if self.enabled and self._next is not None:
            return self._next_state
        return self._state_fn() if self._state_fn is not None else None

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield self.next()

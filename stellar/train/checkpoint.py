"""Checkpoints: one directory per save, written whole and then renamed into place.

Layout of a run directory::

    DIR/checkpoints/step_00000100/model.safetensors   the model's weights (one process, or DDP)
    DIR/checkpoints/step_00000100/sharded/            ... or, for FSDP2, model and optimizer as a
                                                      torch.distributed.checkpoint (one file per rank)
    DIR/checkpoints/step_00000100/state.pt            step, optimizer (not sharded), schedule, and per
                                                      rank: RNG state and loader position
    DIR/checkpoints/step_00000100/config.yaml         the run's merged config (to rebuild the model)
    DIR/checkpoints/latest                            the name of the newest complete checkpoint

A save writes everything into ``checkpoints/.tmp-step_...`` (with FSDP2 every rank writes its
shard there) and renames that directory into place with ``os.replace``; only then is ``latest``
replaced (again a temporary file and ``os.replace``). A crash at any point leaves the previous
checkpoint and ``latest`` as they were. The newest ``keep`` checkpoints are kept.

Both kinds are read by ``load_pretrained`` (eval, viz) in one process; a sharded checkpoint saved
on N processes is resharded by torch.distributed.checkpoint when it is loaded on M.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from . import distributed
from .config import read_yaml, save_config

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
SHARDED = "sharded"
CONFIG = "config.yaml"
_NAME = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


# --------------------------------------------------------------------------- RNG state

def capture_rng() -> dict:
    """The torch, numpy, python (and the current CUDA device's, when used) generator states.

    Only the current CUDA device's: ``get_rng_state_all`` would open a context on every GPU of
    the machine from every process of a multi-GPU run.
    """
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: Mapping) -> None:
    """Undo ``capture_rng``."""
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):             # older checkpoints: every device's state
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# --------------------------------------------------------------------------- writing

def _write_weights(model: torch.nn.Module, path: Path, step: int) -> None:
    save_model(unwrap(model), str(path), metadata={"format": "stellar", "step": str(step)})


def _write_state(state: Mapping, path: Path) -> None:
    torch.save(dict(state), path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    state: Mapping,
    config: Mapping | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` of ``run_dir`` atomically and prune all but the newest ``keep``.

    One process writes it (rank 0 of a DDP run: the weights are the same on every rank).
    ``state`` is any torch-serializable mapping (optimizer, schedule, RNG, loader position...);
    ``step`` is added to it. Returns the checkpoint directory.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root, final = _paths(run_dir, step)
    tmp = _fresh_dir(root / f".tmp-{final.name}-{os.getpid()}")
    _write_weights(model, tmp / WEIGHTS, step)
    _finish(tmp, final, step, state, config, keep)
    return final


def save_sharded_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: Mapping,
    config: Mapping | None = None,
    keep: int = 2,
) -> Path:
    """The FSDP2 form of ``save_checkpoint``; every rank calls it (it is a collective).

    Model and optimizer go to ``sharded/`` through torch.distributed.checkpoint, each rank
    writing its own shards into the same temporary directory; rank 0 then adds ``state`` and the
    config and renames the directory into place, as ``save_checkpoint`` does.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root, final = _paths(run_dir, step)
    tmp = root / distributed.broadcast_from_main(f".tmp-{final.name}-{os.getpid()}")
    if distributed.is_main():
        _fresh_dir(tmp)
    distributed.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / SHARDED))
    distributed.barrier()               # every shard is on disk (dcp fsyncs its files)
    if distributed.is_main():
        _fsync(tmp / SHARDED)
        _finish(tmp, final, step, state, config, keep)
    distributed.barrier()
    return final


def _paths(run_dir: str | os.PathLike, step: int) -> tuple[Path, Path]:
    root = Path(run_dir) / CHECKPOINTS
    return root, root / checkpoint_name(step)


def _fresh_dir(tmp: Path) -> Path:
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _finish(tmp: Path, final: Path, step: int, state: Mapping, config: Mapping | None, keep: int) -> None:
    """Write the state and config into ``tmp``, sync, rename it to ``final``, point ``latest`` at it, prune."""
    root = final.parent
    _write_state({**state, "step": step}, tmp / STATE)
    if config is not None:
        save_config(config, tmp / CONFIG)
    for path in tmp.iterdir():
        if path.is_file():
            _fsync(path)
    _fsync(tmp)

    if final.exists():  # the same step saved again (e.g. a stop followed by the end of the run)
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync(root)
    _write_text_atomic(root / LATEST, final.name + "\n")
    _prune(root, keep, protect=final)


def _prune(root: Path, keep: int, protect: Path) -> None:
    """Remove checkpoints older than the newest ``keep`` and debris of interrupted saves."""
    for path in root.iterdir():
        if path.name.startswith((".tmp-", ".old-")) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    steps = sorted(list_checkpoints(root.parent), key=lambda p: _step_of(p))
    for path in steps[:-keep]:
        if path != protect:
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- reading

def _step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def has_weights(path: Path) -> bool:
    """Whether ``path`` holds a checkpoint's weights: ``model.safetensors`` or a complete ``sharded/``."""
    return (path / WEIGHTS).is_file() or (path / SHARDED / ".metadata").is_file()


def is_sharded(checkpoint: str | os.PathLike) -> bool:
    """True for an FSDP2 checkpoint (torch.distributed.checkpoint shards instead of safetensors)."""
    return (Path(checkpoint) / SHARDED / ".metadata").is_file()


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and has_weights(p)]
    return sorted(found, key=_step_of)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names (or the newest complete one if the pointer is missing)."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if has_weights(path) and (path / STATE).is_file():
            return path
    found = [p for p in list_checkpoints(run_dir) if (p / STATE).is_file()]
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from either a run directory (its latest) or a checkpoint directory."""
    path = Path(path)
    if has_weights(path):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {path} (expected {path}/{CHECKPOINTS}/{LATEST} or {path}/{WEIGHTS})")
    return found


def load_state(checkpoint: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The state mapping saved beside the weights."""
    return torch.load(Path(checkpoint) / STATE, map_location=map_location, weights_only=True)


def load_weights(checkpoint: str | os.PathLike, model: torch.nn.Module, strict: bool = True) -> None:
    """Load the checkpoint's weights into ``model`` (a plain module, or DDP around one).

    Reads ``model.safetensors``, or gathers the shards of an FSDP2 checkpoint into full tensors
    (torch.distributed.checkpoint, in this process alone). ``strict`` raises on missing or
    unexpected keys.
    """
    if is_sharded(checkpoint):
        _load_sharded_weights(Path(checkpoint), unwrap(model), strict)
        return
    missing, unexpected = load_model(unwrap(model), str(Path(checkpoint) / WEIGHTS), strict=False)
    if strict and (missing or unexpected):
        raise KeyError(f"checkpoint {checkpoint} does not fit the model: missing {sorted(missing)}, "
                       f"unexpected {sorted(unexpected)}")


def _load_sharded_weights(checkpoint: Path, model: torch.nn.Module, strict: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    wanted = {"model": model.state_dict()}
    try:
        dcp.load(wanted, checkpoint_id=str(checkpoint / SHARDED), no_dist=not distributed.initialized(),
                 planner=DefaultLoadPlanner(allow_partial_load=not strict))
    except Exception as exc:
        raise KeyError(f"checkpoint {checkpoint} does not fit the model: {exc}") from exc
    model.load_state_dict(wanted["model"], strict=strict)


def load_training_state(checkpoint: str | os.PathLike, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> dict:
    """Model, optimizer and the rest of a checkpoint for a resumed run; returns the state mapping.

    Every rank calls it. A sharded (FSDP2) checkpoint is resharded by torch.distributed.checkpoint
    onto the current model, whatever the number of processes (FSDP2 on M ranks, DDP or one
    process). A ``model.safetensors`` checkpoint loads into one process or DDP; not into FSDP2.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    checkpoint = Path(checkpoint)
    state = load_state(checkpoint)
    if is_sharded(checkpoint):
        import torch.distributed.checkpoint as dcp

        model_state, optim_state = get_state_dict(model, optimizer)
        wanted = {"model": model_state, "optimizer": optim_state}
        dcp.load(wanted, checkpoint_id=str(checkpoint / SHARDED), no_dist=not distributed.initialized())
        set_state_dict(model, optimizer, model_state_dict=wanted["model"], optim_state_dict=wanted["optimizer"])
        return state
    if distributed.is_sharded(model):
        raise ValueError(f"checkpoint {checkpoint} was saved by one process or DDP (model.safetensors): resume it "
                         f"with train.parallel=ddp, not fsdp")
    load_weights(checkpoint, model)
    optimizer.load_state_dict(state["optimizer"])
    return state


def rank_state(state: Mapping, rank: int) -> dict | None:
    """This rank's own part of a checkpoint's state: ``{"rng": ..., "loader": ...}``, or None.

    Saved by N processes and resumed by M: rank r < N takes rank r's; a rank beyond N takes None
    (a fresh RNG stream; its loader position is the global one, see ``pretrain``).
    Checkpoints from before per-rank states held rank 0's at the top level.
    """
    ranks = state.get("ranks")
    if ranks is None:
        return {"rng": state.get("rng"), "loader": state.get("loader")} if "rng" in state else None
    return ranks[rank] if rank < len(ranks) else None


def load_config_of(checkpoint: str | os.PathLike) -> dict:
    """The merged config saved with a checkpoint (or with its run)."""
    checkpoint = Path(checkpoint)
    for path in (checkpoint / CONFIG, checkpoint.parent.parent / CONFIG):
        if path.is_file():
            return read_yaml(path)
    raise FileNotFoundError(f"no {CONFIG} beside checkpoint {checkpoint}")


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """``(model, config, step)`` rebuilt from a run or checkpoint directory, in eval mode."""
    from stellar.model import build_model

    checkpoint = resolve_checkpoint(path)
    cfg = load_config_of(checkpoint)
    model = build_model(cfg["model"], init=False)    # the weights come from the checkpoint, not model.init
    load_weights(checkpoint, model)             # safetensors, or the shards of an FSDP2 run gathered
    step = load_state(checkpoint).get("step", -1) if (checkpoint / STATE).is_file() else -1
    return model.to(device).eval(), cfg, step

"""Checkpoints: one directory per save, written whole and then renamed into place.

Layout of a run directory::

    DIR/checkpoints/step_00000100/model.safetensors   the model's weights
    DIR/checkpoints/step_00000100/state.pt            step, optimizer, schedule, RNG, loader position
    DIR/checkpoints/step_00000100/config.yaml         the run's merged config (to rebuild the model)
    DIR/checkpoints/latest                            the name of the newest complete checkpoint

A save writes everything into ``checkpoints/.tmp-step_...`` and renames that directory into
place with ``os.replace``; only then is ``latest`` replaced (again a temporary file and
``os.replace``). A crash at any point leaves the previous checkpoint and ``latest`` as they were.
The newest ``keep`` checkpoints are kept.
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

from .config import read_yaml, save_config

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
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
    """The torch, numpy, python (and CUDA, when present) generator states, as plain tensors/tuples."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping) -> None:
    """Undo ``capture_rng``."""
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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

    ``state`` is any torch-serializable mapping (optimizer, schedule, RNG, loader position...);
    ``step`` is added to it. Returns the checkpoint directory.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _write_weights(model, tmp / WEIGHTS, step)
    _write_state({**state, "step": step}, tmp / STATE)
    if config is not None:
        save_config(config, tmp / CONFIG)
    for path in tmp.iterdir():
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
    return final


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


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / WEIGHTS).is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names (or the newest complete one if the pointer is missing)."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / WEIGHTS).is_file() and (path / STATE).is_file():
            return path
    found = [p for p in list_checkpoints(run_dir) if (p / STATE).is_file()]
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from either a run directory (its latest) or a checkpoint directory."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {path} (expected {path}/{CHECKPOINTS}/{LATEST} or {path}/{WEIGHTS})")
    return found


def load_state(checkpoint: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The state mapping saved beside the weights."""
    return torch.load(Path(checkpoint) / STATE, map_location=map_location, weights_only=True)


def load_weights(checkpoint: str | os.PathLike, model: torch.nn.Module, strict: bool = True) -> None:
    """Load ``model.safetensors`` into ``model``; ``strict`` raises on missing or unexpected keys."""
    missing, unexpected = load_model(unwrap(model), str(Path(checkpoint) / WEIGHTS), strict=False)
    if strict and (missing or unexpected):
        raise KeyError(f"checkpoint {checkpoint} does not fit the model: missing {sorted(missing)}, "
                       f"unexpected {sorted(unexpected)}")


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
    load_weights(checkpoint, model)
    step = load_state(checkpoint).get("step", -1) if (checkpoint / STATE).is_file() else -1
    return model.to(device).eval(), cfg, step

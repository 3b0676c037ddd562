"""Reading weight files from the local disk (never the network)."""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor


def read_state_dict(path: str | os.PathLike, arg: str = "path") -> Mapping[str, Tensor]:
    """The state dict in a ``.safetensors`` file or a torch file (read with ``weights_only=True``),
    unwrapped from a ``{"state_dict": ...}`` checkpoint (Lightning's layout).

    `arg` names the caller's argument in the errors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{arg}: no weights file at {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path, device="cpu")
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{arg}: {path!r} does not hold a state dict")
    return sd

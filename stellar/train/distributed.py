"""The few collectives the harness needs; every one is a no-op unless torch.distributed is initialized."""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``values`` over all ranks (``values`` itself when not distributed).

    Used on the step's loss vector so that every rank logs and checks the same numbers (a NaN on
    one rank stops all of them together instead of leaving the others waiting in a collective).
    """
    if world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / world_size()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when distributed, else ``model``."""
    if world_size() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    # Not every head runs on every step (e.g. the token head when the pixel head is on).
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

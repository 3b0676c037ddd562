"""Many processes: start-up from torchrun's environment, DDP / FSDP2, the few collectives the
harness needs, and a heartbeat that names a rank that died.

    torchrun --nproc_per_node 8 -m stellar pretrain --config configs/vitb16.yaml --out runs/b16

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
``process_group`` starts the default group from them (nccl for a CUDA device, gloo for the CPU)
and destroys it at the end. A plain ``stellar pretrain`` has none of them: one process, no group,
and every collective below is a no-op.

The heartbeat: every rank bumps a counter of its own in the rendezvous store once a second
(a daemon thread). When a collective fails (gloo reports a dead peer at once), ``lost_ranks``
reads the counters twice and names the ranks whose counter stopped. A collective that hangs
instead (NCCL waits for a dead peer until its timeout; a frozen peer) is caught by the same
thread: each rank watches the next one, and when that rank's counter has not moved for half of
``train.dist_timeout_s`` the watcher prints which rank was lost and ends its process.
"""
from __future__ import annotations

import inspect
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

PARALLEL = ("ddp", "fsdp")


class RankLostError(RuntimeError):
    """Another rank of the run died or stopped responding; this rank stops too."""


# --------------------------------------------------------------------------- who am I

def launched_by_torchrun() -> bool:
    """True when torchrun (or an equivalent launcher) set RANK and WORLD_SIZE."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def restart_count() -> int:
    """How often torchrun restarted the workers (``--max-restarts``); 0 on the first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    return rank() == 0


def host() -> str:
    return socket.gethostname()


# --------------------------------------------------------------------------- start and stop

_HEARTBEAT: "Heartbeat | None" = None


@contextmanager
def process_group(device: torch.device, timeout_s: float) -> Iterator[bool]:
    """The default process group from torchrun's environment, for the duration of the block.

    Yields True when this call started the group. Without torchrun's variables, or with a group
    that already exists (started by the caller), it does nothing. ``timeout_s`` bounds every
    collective (c10d/NCCL timeouts) and the heartbeat's patience.
    """
    if not launched_by_torchrun() or initialized():
        yield False
        return
    start(device, timeout_s)
    clean = False
    try:
        yield True
        clean = True
    except (RankLostError, dist.DistError):
        raise                       # a peer is gone: leave the broken group to the process exit
    except BaseException:
        clean = True
        raise
    finally:
        stop(destroy=clean)


def start(device: torch.device, timeout_s: float) -> None:
    """``init_process_group`` from the environment (nccl on CUDA, gloo on the CPU) and the heartbeat."""
    global _HEARTBEAT
    if timeout_s is None or timeout_s <= 0:
        raise ValueError(f"train.dist_timeout_s must be a positive number of seconds, got {timeout_s!r}")
    timeout = timedelta(seconds=float(timeout_s))
    store, rank_, world = next(dist.rendezvous("env://", timeout=timeout))
    # torchrun's agent keeps one store across --max-restarts attempts: without a prefix per attempt
    # the restarted workers read the dead ones' gloo/NCCL addresses and fail to connect.
    store = dist.PrefixStore(f"stellar/attempt_{restart_count()}/", store)
    if device.type == "cuda":
        dist.init_process_group("nccl", store=store, rank=rank_, world_size=world, timeout=timeout,
                                device_id=device)
    else:
        dist.init_process_group("gloo", store=store, rank=rank_, world_size=world, timeout=timeout)
    # Half the collective timeout: a frozen rank is named before NCCL's watchdog aborts without a name.
    _HEARTBEAT = Heartbeat(dist.PrefixStore("stellar/heartbeat/", store), rank_, world,
                           lost_after_s=float(timeout_s) / 2)
    _HEARTBEAT.start()
    barrier()                       # every rank's heartbeat exists before anyone looks at it


def stop(destroy: bool = True) -> None:
    global _HEARTBEAT
    if _HEARTBEAT is not None:
        _HEARTBEAT.stop()
        _HEARTBEAT = None
    if destroy and initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- collectives

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


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(value: Any) -> list | None:
    """``[value of rank 0, value of rank 1, ...]`` on rank 0, None on the others."""
    if world_size() == 1:
        return [value]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(value, out, dst=0)
    return out


def run_on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only; its result -- or the exception it raised -- reaches every rank.

    For the steps one process must do alone (the run directory's lock, its config): when rank 0
    refuses, the others raise the same error instead of waiting for it in a collective.
    """
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as exc:        # re-raised below, on every rank
            error = exc
    if world_size() > 1:
        result, shared_error = broadcast_from_main((result, error))
        error = error or shared_error
    if error is not None:
        raise error
    return result


# --------------------------------------------------------------------------- wrapping

def wrap_model(model: torch.nn.Module, device: torch.device, parallel: str = "ddp",
               param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """``model`` for the process group: DDP or FSDP2 when one is initialized, else ``model`` itself.

    ddp: DistributedDataParallel without ``find_unused_parameters`` (every parameter gets a
    gradient in every step), gradients all-reduced in 25 MB buckets while the backward runs,
    buckets viewed in place (``gradient_as_bucket_view``), no buffer broadcast (the model's
    buffers are constants). fsdp: ``fully_shard`` on every transformer block, then on the root;
    with ``param_dtype`` (bf16 on CUDA) parameters are gathered in that dtype and gradients
    reduced in float32.
    """
    if parallel not in PARALLEL:
        raise ValueError(f"train.parallel must be one of {PARALLEL}, got {parallel!r}")
    if not initialized():
        return model
    if parallel == "fsdp":
        return shard_model(model, param_dtype)
    ids = [device.index] if device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel
    # No buffer broadcast before each forward (torch >= 2.12 names it forward_sync_buffers).
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})
    return ddp(model, device_ids=ids, find_unused_parameters=False, gradient_as_bucket_view=True, **no_sync)


def shard_model(model: torch.nn.Module, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` each ``stellar.nn.vit.Block`` (encoder, decoder and an EMA teacher's
    encoder), then the root. The teacher's shards match the student's, so ``update_teacher`` (the
    trainer calls it after the optimizer step, outside the forward) averages shard by shard."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from stellar.nn.vit import Block

    policy = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
              if param_dtype is not None else MixedPrecisionPolicy())
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a model wrapped by FSDP2's ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# --------------------------------------------------------------------------- a lost rank

class Heartbeat:
    """A counter per rank in the rendezvous store, bumped every ``interval_s`` by a daemon thread.

    The thread also watches the next rank's counter: still for ``lost_after_s`` means that rank
    died or froze, and the watcher ends this process (exit code 1) with a message naming it --
    the way out of a collective that would otherwise wait for the dead rank.
    """

    def __init__(self, store, rank: int, world_size: int, interval_s: float = 1.0, lost_after_s: float = 600.0):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.interval_s, self.lost_after_s = interval_s, lost_after_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stellar-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self.store.set(f"who/{self.rank}", f"pid {os.getpid()} on {host()}")
        self.store.add(str(self.rank), 1)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5 * self.interval_s)

    def who(self, rank: int) -> str:
        try:
            return self.store.get(f"who/{rank}").decode()
        except Exception:               # the store is gone too
            return "pid and host unknown"

    def counters(self) -> list[int]:
        return [self.store.add(str(r), 0) for r in range(self.world_size)]

    def lost_ranks(self) -> list[int]:
        """The ranks whose counter did not move in 2.5 intervals (raises if the store is unreachable)."""
        before = self.counters()
        time.sleep(2.5 * self.interval_s)
        after = self.counters()
        return [r for r, (a, b) in enumerate(zip(before, after)) if a == b and r != self.rank]

    def _run(self) -> None:
        watched = (self.rank + 1) % self.world_size
        last, since = None, time.monotonic()
        while not self._stop.wait(self.interval_s):
            try:
                self.store.add(str(self.rank), 1)
                value = self.store.add(str(watched), 0) if watched != self.rank else None
            except Exception:           # store unreachable: the main thread's collectives report it
                value = last
            now = time.monotonic()
            if value != last:
                last, since = value, now
            elif now - since > self.lost_after_s and not self._stop.is_set():
                print(f"stellar: rank {self.rank}: lost rank {watched} ({self.who(watched)}): no heartbeat for "
                      f"{now - since:.0f} s (half of train.dist_timeout_s); stopping this process. "
                      f"Continue from the last checkpoint with --resume.", file=sys.stderr, flush=True)
                os._exit(1)


def explain_failure(exc: BaseException, hint: str = "") -> BaseException:
    """A ``RankLostError`` naming the lost ranks when ``exc`` comes from a peer that died, else ``exc``.

    Called on a RuntimeError raised while a process group is up: if every rank's heartbeat still
    moves, the error is this rank's own and is returned unchanged.
    """
    beat = _HEARTBEAT
    if beat is None or world_size() == 1:
        return exc
    first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    try:
        lost = beat.lost_ranks()
    except Exception:                   # the store's host (rank 0, or torchrun's agent) is gone
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        return RankLostError(
            f"rank {beat.rank}: lost the rendezvous store at {where}, hosted by rank 0 (or by torchrun's agent): "
            f"rank 0 is gone. The failed collective said: {first_line}. {hint}".strip())
    if not lost:
        return exc
    names = ", ".join(f"rank {r} ({beat.who(r)})" for r in lost)
    return RankLostError(f"rank {beat.rank}: lost {names}: it died or stopped responding. The failed collective "
                         f"said: {first_line}. {hint}".strip())

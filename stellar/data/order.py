"""The one sample order: which file each rank reads, in which batch, for every backend.

An epoch is a permutation of the dataset's n files, a pure function of (seed, epoch) (the
identity without shuffling). It is cut into global batches of `world_size * batch_size`
consecutive positions, and rank r takes rows [r * batch_size, (r + 1) * batch_size) of each:

    epoch order   p = 0 1 2 3 4 5 6 7 | 8 9 ...          (positions in the epoch's permutation)
    world 2, b 2  rank 0: [0 1] [4 5]   rank 1: [2 3] [6 7]
    world 1, b 4  rank 0: [0 1 2 3] [4 5 6 7]             (the same global batches)

so 2 processes with batch b read exactly the samples 1 process with batch 2b reads. A sample is
named by its *position* p in the epoch's order (its "global sample index"): every random draw
of the sample (crop windows, colours, kept patches; `stellar.data.draws`) is seeded by
(seed, epoch, p), so it is the same whatever the world size, the backend or a resume.

Bad files do not move anything: the order is over all n files whatever is known about them.
The sample whose file cannot be decoded takes the next file of the sorted file list that can
(`candidates`, cyclically), keeping its position and so its draws; every backend and every world
size substitute the same way. (A list from `stellar data check`, read by every backend alike,
only spares the decoders a file known to be bad.)

Position and resume: a loader's state is (epoch, position), `position` counting the samples of
the epoch's order handed out by all ranks together (a multiple of the global batch). Restored
on any world size and per-rank batch, the loader continues the same global sample stream from
that position: with the same global batch, the same batches. With drop_last (training), only
whole global batches are read; without it the last, partial global batch is cut the same way,
so the last ranks get a shorter or no final batch.

This module imports nothing else of `stellar.data`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

__all__ = ["SampleOrder", "Slice", "stream_seed", "resolve_shard", "STATE_KEYS"]

STATE_KEYS = ("epoch", "position", "seed", "global_batch")


def stream_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (e.g. seed, epoch, position); stable across processes."""
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def resolve_shard(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): the explicit arguments, else torch.distributed's when a process group
    is initialized, else (0, 1)."""
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    return rank, world_size


@dataclass(frozen=True)
class Slice:
    """This rank's part of one global batch.

    epoch; positions: the samples' positions in the epoch's order (the key of their draws);
    indices: the files at those positions (before any substitution); end: the position where
    the global batch ends (the loader's position once this batch is handed out).
    """

    epoch: int
    positions: tuple
    indices: tuple
    end: int


class SampleOrder:
    """(seed, epoch, world size, rank) -> this rank's slice of each global batch of an epoch.

    num_samples: files in the dataset (bad ones included). batch_size: per rank.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = True):
        for name, v, low in (("num_samples", num_samples, 1), ("batch_size", batch_size, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.rank, self.world_size = resolve_shard(rank, world_size)
        self.n, self.batch_size, self.seed = num_samples, batch_size, seed
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.global_batch = batch_size * self.world_size
        if drop_last and num_samples < self.global_batch:
            raise ValueError(f"batch_size {batch_size} x world_size {self.world_size} = {self.global_batch} is more "
                             f"than the {num_samples} images: with drop_last no batch is left")

    def permutation(self, epoch: int) -> torch.Tensor:
        """LongTensor[n]: the file at each position of `epoch` (the same on every rank)."""
        if self.shuffle:
            return torch.randperm(self.n, generator=torch.Generator().manual_seed(stream_seed(self.seed, epoch, -1)))
        return torch.arange(self.n)

    def batch_starts(self, start: int = 0) -> range:
        """Positions where the global batches read from `start` on begin."""
        if self.drop_last:
            return range(start, self.n - self.global_batch + 1, self.global_batch)
        return range(start, self.n, self.global_batch)

    def slices(self, epoch: int, start: int = 0) -> list[Slice]:
        """This rank's slices of the global batches of `epoch` from position `start` (empty ones left out)."""
        perm = self.permutation(epoch)
        out = []
        for g in self.batch_starts(start):
            end = min(g + self.global_batch, self.n)
            lo = min(g + self.rank * self.batch_size, end)
            hi = min(lo + self.batch_size, end)
            if hi > lo:
                out.append(Slice(epoch, tuple(range(lo, hi)), tuple(perm[lo:hi].tolist()), end))
        return out

    def num_batches(self) -> int:
        """This rank's batches in a whole epoch."""
        if self.drop_last:
            return self.n // self.global_batch
        full, rest = divmod(self.n, self.global_batch)
        return full + (1 if rest > self.rank * self.batch_size else 0)

    def epoch_done(self, position: int) -> bool:
        """No global batch is left to read from `position` on."""
        return len(self.batch_starts(position)) == 0

    def candidates(self, index: int):
        """The files a sample of file `index` may use, in order: `index`, then the next files of
        the sorted list, cyclically (the substitutes of a bad file)."""
        for step in range(self.n):
            yield (index + step) % self.n

    # -- the state: one format for every backend ---------------------------------------------------
    def state(self, epoch: int, position: int) -> dict:
        return {"epoch": int(epoch), "position": int(position), "seed": self.seed, "global_batch": self.global_batch}

    def check_state(self, state) -> tuple[int, int]:
        """(epoch, position) of a loader `state_dict()`; ValueError when it belongs to another stream."""
        if not isinstance(state, dict) or any(k not in state for k in ("epoch", "position")):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state must be a loader state_dict() with keys {list(STATE_KEYS)}, got {got}")
        epoch, position = state["epoch"], state["position"]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in (epoch, position)):
            raise ValueError(f"state epoch and position must be non-negative ints, got {epoch!r}, {position!r}")
        if position > self.n:
            raise ValueError(f"state position {position} is past the end of an epoch of {self.n} images")
        if "seed" in state and state["seed"] != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, this loader has seed {self.seed}: "
                             "it would be another sample stream")
        return epoch, position

    def __len__(self) -> int:
        return self.num_batches()

    def __repr__(self) -> str:
        return (f"SampleOrder(n={self.n}, batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, "
                f"global_batch={self.global_batch}, shuffle={self.shuffle}, drop_last={self.drop_last})")

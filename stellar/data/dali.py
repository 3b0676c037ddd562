"""The DALI decode pipeline of the `dali` loader backend.

`fn.readers.file` reads an explicit list of files (this epoch's order) and shards it by rank;
`fn.decoders.image` decodes to RGB (grayscale, CMYK, PNG and palette images come out as 3
channels) with device "mixed" (nvJPEG, the GPU's hardware decoder where there is one) when the
pipeline has a GPU and "cpu" otherwise. The decoded images reach torch through DLPack, without a
copy, as uint8 `[H, W, 3]` tensors on the pipeline's device, which is what
`torch.ops.stellar.multicrop` reads.

Why the loader passes its own order instead of `random_shuffle=True`: DALI's shuffle is a
buffer of `initial_fill` samples (not a permutation of the epoch) and `shuffle_after_epoch`
uses a seed of its own; with an explicit list every rank derives the same permutation from
(seed, epoch), the shards are disjoint by construction, and a pipeline rebuilt mid-epoch (after
a decode failure, or on resume) starts exactly where the last one stopped.

A DALI pipeline that fails to decode one file raises and is unusable afterwards; the loader
(`stellar.data.gpu_loaders.DaliLoader`) rebuilds it without the file. `failed_file` reads the
file's name from DALI's message.

nvidia.dali is imported only when a pipeline is built, so this module imports without DALI.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch

INSTALL_HINT = (
    "NVIDIA DALI is not installed: `pip install nvidia-dali-cuda130` (or `pip install 'stellar[dali]'`), "
    "or pick another loader backend (backend='torchvision' or 'reference')"
)


def dali_available() -> bool:
    """Whether nvidia.dali imports."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def require_dali():
    """Import nvidia.dali or raise an ImportError saying how to install it."""
    try:
        import nvidia.dali
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return nvidia.dali


def resolve_shard(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(shard id, shard count): the explicit arguments, else torch.distributed's rank and world
    size when a process group is initialized, else (0, 1)."""
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


def shard_range(n: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """[start, end) of shard `shard_id` of n samples, DALI's split: floor(n * i / num_shards)."""
    return n * shard_id // num_shards, n * (shard_id + 1) // num_shards


def build_pipeline(
    files: Sequence[str],
    batch_size: int,
    shard_id: int = 0,
    num_shards: int = 1,
    device_id: int | None = None,
    num_threads: int = 2,
    seed: int = 0,
    prefetch: int = 2,
):
    """A built DALI pipeline decoding `files` in order, one shard of them.

    files: the epoch's file list (all shards); the reader yields files[shard_range(...)] of it.
    Outputs per `run()`: images (uint8 `[H_i, W_i, 3]` RGB per sample, on the GPU when
    `device_id` is set, else on the CPU) and `index` (int32 `[1]` per sample: the sample's
    position in `files`). The last batch of the shard is padded by repeating its last sample;
    the caller trims it (it knows the shard size).
    device_id: CUDA device for the "mixed" decoder, or None for a CPU-only pipeline.
    """
    require_dali()
    from nvidia.dali import fn, pipeline_def, types

    if len(files) == 0:
        raise ValueError("files must not be empty")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must lie in [0, num_shards={num_shards}), got {shard_id}")
    files = [str(f) for f in files]

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=prefetch,
    )
    def _pipeline():
        encoded, index = fn.readers.file(
            files=files,
            labels=list(range(len(files))),
            shard_id=shard_id,
            num_shards=num_shards,
            random_shuffle=False,
            pad_last_batch=True,
            name="reader",
        )
        images = fn.decoders.image(
            encoded, device="cpu" if device_id is None else "mixed", output_type=types.RGB
        )
        return images, index

    pipe = _pipeline()
    pipe.build()
    return pipe


def run_to_torch(pipe, stream: torch.cuda.Stream | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One batch of `pipe` as torch tensors, without copying the images.

    Returns (images, index): images a list of uint8 Tensor[H_i, W_i, 3] sharing DALI's buffers
    (valid until the next `run()` of `pipe`: consume them before), index LongTensor[batch] (CPU).
    On a GPU pipeline the outputs are bound to `stream` (default: torch's current stream), so no
    host synchronisation happens here.
    """
    if pipe.device_id is not None and torch.cuda.is_available():
        stream = stream if stream is not None else torch.cuda.current_stream()
        images, index = pipe.run(stream)
    else:
        images, index = pipe.run()
    tensors = [torch.from_dlpack(images[i]) for i in range(len(images))]
    idx = torch.from_dlpack(index.as_tensor()).reshape(-1).long()  # reader labels: on the CPU
    return tensors, idx


_FAILED = re.compile(r"Failed to decode sample #\d+\s*:\s*(\S.*?)\s*$", re.MULTILINE)


def failed_file(error: BaseException) -> str | None:
    """The path DALI names in a decode error ("Failed to decode sample #i : PATH"), if any."""
    m = _FAILED.search(str(error))
    return m.group(1) if m else None

"""Where the `dali` backend turns bytes into pixels: a DALI decode pipeline fed batch by batch.

The pipeline has one input, the encoded files of a batch (`fn.external_source`, read and
screened by the loader's workers, so DALI never reads a file list of its own and never sees bytes
the screen refused), and one operator, `fn.decoders.image` to RGB: device "mixed" (nvJPEG and
the GPU's hardware JPEG decoder) on `cuda:N` when the loader's device is a GPU, "cpu" otherwise.
EXIF orientation is left to `stellar.data.decode.apply_orientation` (`adjust_orientation=False`),
so every backend turns images upright with the same parser.

Executor: `exec_dynamic=True` is passed explicitly (the mode in which `pipe.run(cuda_stream)`
returns outputs ordered on that stream, which the loader reads without a copy through DLPack)
with `prefetch_queue_depth=1` (inputs are given to `run`; the loader's reader workers prefetch).
A batch that fails to decode leaves the pipeline unusable ("no longer valid"): the loader
decodes that batch's files with the reference decoder and builds a new pipeline.

nvidia.dali is imported only here and only when a pipeline is built or DALI is probed, so the
package imports without DALI; a failed import is reported with its reason, never turned into
another backend.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["INSTALL_HINT", "dali_status", "require_dali", "build_decoder", "decode_batch"]

INSTALL_HINT = ("install NVIDIA DALI: `pip install 'stellar[dali]'` (nvidia-dali-cuda130, the version range "
                "setup.py pins), or pick another loader backend (data.backend=torchvision or reference)")


def dali_status() -> tuple[bool, str | None]:
    """(True, None) when nvidia.dali imports; else (False, why), with the import error's own words."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception as e:  # noqa: BLE001  a broken install raises more than ImportError: report it
        return False, f"{type(e).__name__}: {e}".splitlines()[0]
    return True, None


def require_dali():
    """Import nvidia.dali, or raise an ImportError with the reason and how to install it."""
    ok, why = dali_status()
    if not ok:
        raise ImportError(f"the dali backend needs NVIDIA DALI, which does not import ({why}): {INSTALL_HINT}")
    import nvidia.dali

    return nvidia.dali


def build_decoder(batch_size: int, device_id: int | None = None, num_threads: int = 2):
    """A built pipeline decoding up to `batch_size` encoded images per `run` to uint8 RGB HWC.

    device_id: the CUDA device of the "mixed" decoder (the loader passes its own `cuda:N`, never
    a default), or None for a CPU-only pipeline.
    """
    require_dali()
    from nvidia.dali import fn, pipeline_def, types

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if device_id is not None and (isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0):
        raise ValueError(f"device_id must be a CUDA device index or None, got {device_id!r}")

    @pipeline_def(batch_size=batch_size, num_threads=max(1, int(num_threads)), device_id=device_id, seed=0,
                  exec_dynamic=True, prefetch_queue_depth=1)
    def _pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        return fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed", output_type=types.RGB,
                                 adjust_orientation=False)

    pipe = _pipeline()
    pipe.build()
    return pipe


def decode_batch(pipe, encoded: Sequence[np.ndarray], stream: "torch.cuda.Stream | None" = None):
    """Decode one batch: encoded, 1-D uint8 arrays (at most the pipeline's batch size).

    Returns (images, outputs): images a list of uint8 Tensor[H_i, W_i, 3] sharing DALI's
    buffers (no copy), on the pipeline's device; `outputs` the DALI TensorList that owns them:
    keep it alive until the work reading the images has finished. A GPU pipeline runs on
    `stream` and its outputs are ordered on it (no host synchronisation here). Raises
    RuntimeError (DALI's) when any image of the batch fails to decode.
    """
    if pipe.device_id is not None:
        if stream is None:
            raise ValueError("stream must be the CUDA stream the decoded images are used on")
        (outputs,) = pipe.run(stream, encoded=list(encoded))
    else:
        (outputs,) = pipe.run(encoded=list(encoded))
    return [torch.from_dlpack(outputs[i]) for i in range(len(outputs))], outputs

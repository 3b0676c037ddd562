"""What both ops (`factorize`, `prototype_cross_entropy`) use to pick and launch a path: the
backend rule, whether Triton is installed or interpreting, and the device guard of a launch.
Imports no Triton."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings

import torch
from torch import Tensor

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "triton", "torch")
_WARNED_NO_TRITON: set = set()


# Looked up once at import: torch.compile cannot trace importlib.util.find_spec (a graph break,
# an error under fullgraph=True, seen on the H200), and the answer does not change in a process.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def interpreting() -> bool:
    """TRITON_INTERPRET=1: the kernels run on CPU tensors in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_guard(device: torch.device):
    """Launch on the tensors' GPU, not the current one (no-op for CPU tensors in the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def resolve_backend(op: str, backend: str, t: Tensor, arg: str) -> str:
    """"triton" or "torch" for `op` on the tensor `t` (named `arg` in errors).

    "auto": the Triton kernels for float32/bfloat16/float16 CUDA tensors, the reference for CPU
    tensors and float64 (by design, silently); CUDA tensors without Triton installed take the
    reference with a warning (once per op). "triton": checked (dtype, Triton installed, CUDA
    tensors or TRITON_INTERPRET=1), errors naming `arg`. "torch": the reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if not (t.is_cuda and t.dtype in TRITON_DTYPES):
            return "torch"
        if not triton_available():
            if op not in _WARNED_NO_TRITON:
                _WARNED_NO_TRITON.add(op)
                warnings.warn(f"{op}: triton is not installed, so CUDA tensors go through the PyTorch reference "
                              "(pip install triton)", stacklevel=4)
            return "torch"
        return "triton"
    if backend == "triton":
        if t.dtype not in TRITON_DTYPES:
            raise TypeError(f"backend='triton' takes float32, bfloat16 or float16 {arg}, got {t.dtype}")
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if not t.is_cuda and not interpreting():
            raise RuntimeError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before stellar.kernels "
                f"is first used to run the kernels on {t.device.type} tensors in the interpreter"
            )
    return backend


def recoverable_launch_failure(exc: BaseException) -> bool:
    """Launch failures a smaller tile can fix: Triton's OutOfResources (shared memory, threads
    for the register count), and the driver's 'too many resources requested for launch'."""
    import triton  # only reached on the Triton path

    if isinstance(exc, triton.runtime.errors.OutOfResources):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("too many resources requested" in text or "out of resource" in text)

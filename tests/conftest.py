"""Test-wide setup.

The Triton kernels are tested on the CPU through Triton's interpreter: on a machine without CUDA,
TRITON_INTERPRET=1 is set here (it must be set before any kernel module is imported, which is why
it lives in conftest); with a GPU the kernels run for real.
"""
import os
import zlib

# Triton's interpreter runs tl.dot through NumPy: on a small shared CI machine OpenBLAS's thread
# pool spins against the other test processes (measured: one prototype-CE case 22 s -> 8 s of CPU
# with one thread). Set before NumPy/torch are first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gen(request):
    """A fresh, seeded generator per test (seeded from the test's name, so failures reproduce)."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


@pytest.fixture
def poisoned(monkeypatch):
    """Every float buffer allocated with torch.empty starts as NaN (the Triton launchers'
    outputs): an element a kernel leaves unwritten fails the comparison."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)

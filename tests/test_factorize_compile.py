"""torch.compile(fullgraph=True) traces SpatialSemanticFactorization without a graph break.

"aot_eager" exercises tracing, the fake implementations and the registered autograd without a
C++ compiler; "inductor" on the Triton op is the real path (the op stays an opaque call, so only
the two small projections are compiled). Inductor over the torch backend compiles the whole
graph with gcc (~30 s on a shared CI core) and is left to the GPU script.
"""
from __future__ import annotations

import os

import pytest
import torch

from stellar.kernels import backend_info
from stellar.nn.factorization import SpatialSemanticFactorization

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA and not INTERPRET else "cpu"
TRITON_OK = backend_info()["triton_available"] and (INTERPRET or CUDA)
needs_triton = pytest.mark.skipif(
    not TRITON_OK, reason="the Triton kernels need triton and either CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it where no GPU is present)"
)


@pytest.mark.parametrize(
    "backend, compiler",
    [
        ("torch", "aot_eager"),
        pytest.param("triton", "aot_eager", marks=needs_triton),
        pytest.param("triton", "inductor", marks=needs_triton),
    ],
)
def test_compiled_module_matches_eager(backend, compiler):
    torch._dynamo.reset()
    torch.manual_seed(0)
    dim, out = 16, 24
    module = SpatialSemanticFactorization(dim, backend=backend).to(DEVICE)
    decoder_in = torch.nn.Linear(dim, out).to(DEVICE)
    dense = torch.randn(2, 13, dim, device=DEVICE)
    sparse = torch.randn(2, 7, dim, device=DEVICE)

    def step(mod, proj, x, s):
        Z, L = mod(x, s)
        Y, _ = mod(x, s, return_L=False, out_proj=proj)
        return Z.square().sum() + (L * L.detach()).sum() + Y.sum()

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True, backend=compiler)):
        x = dense.clone().requires_grad_()
        s = sparse.clone().requires_grad_()
        module.zero_grad()
        decoder_in.zero_grad()
        loss = fn(module, decoder_in, x, s)
        loss.backward()
        params = [p.grad.clone() for p in (*module.parameters(), *decoder_in.parameters())]
        grads.append((loss.detach(), x.grad, s.grad, *params))
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)

"""The fused factorization against its float64 reference: forward, all gradients, awkward inputs.

The Triton path runs on CUDA tensors, or on CPU tensors in the interpreter (`make test` exports
TRITON_INTERPRET=1); without either those tests skip and say why.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from stellar.kernels import backend_info, factorize, reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA and not INTERPRET else "cpu"
needs_triton = pytest.mark.skipif(
    not backend_info()["triton_available"] or not (INTERPRET or CUDA),
    reason="the Triton kernels need triton and either a CUDA device or TRITON_INTERPRET=1 (set by `make test`)",
)

# Relative to the largest reference magnitude; bf16/fp16 compared to the float64 reference.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
SHAPES = [  # B, N, r, D, Dv
    (1, 1, 1, 16, 16),
    (2, 13, 7, 40, 24),
    (1, 197, 16, 100, 40),
    (2, 13, 16, 16, 100),
    (1, 197, 1, 40, 16),
    (2, 1, 7, 100, 40),
]


def _inputs(B, N, r, D, Dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    sparse_q = torch.randn(B, r, D, generator=g, dtype=torch.float64)
    sparse_v = torch.randn(B, r, Dv, generator=g, dtype=torch.float64)
    return [t.to(DEVICE, dtype) for t in (dense, sparse_q, sparse_v)]


def _close(got, want, dtype, what):
    err = (got.double() - want).abs().max().item()
    scale = max(want.abs().max().item(), 1e-12)
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g} ({dtype})"


def _check_against_reference(inputs, dtype, return_L=True, temperature=0.06, seed=1, **kw):
    """Forward and the three input gradients, same upstream gradients for both paths."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    Z, L = factorize(*leaves, temperature=temperature, return_L=return_L, backend="triton", **kw)
    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    Zr, Lr = reference.factorize(*ref_leaves, temperature, 1e-7)

    g = torch.Generator().manual_seed(seed)
    dZ = torch.randn(Zr.shape, generator=g, dtype=torch.float64).to(DEVICE)
    loss_r = (Zr * dZ).sum()
    loss = (Z.double() * dZ).sum()
    if return_L:
        dL = torch.randn(Lr.shape, generator=g, dtype=torch.float64).to(DEVICE)
        loss_r = loss_r + (Lr * dL).sum()
        loss = loss + (L.double() * dL).sum()
    else:
        assert L is None
    loss.backward()
    loss_r.backward()

    assert Z.dtype == dtype and Z.shape == Zr.shape
    _close(Z, Zr, dtype, "Z")
    if return_L:
        _close(L, Lr, dtype, "L")
    for name, leaf, ref in zip(("dense", "sparse_q", "sparse_v"), leaves, ref_leaves):
        assert leaf.grad.dtype == dtype
        _close(leaf.grad, ref.grad, dtype, f"grad of {name}")


@pytest.fixture
def poisoned(monkeypatch):
    """Every float buffer the launchers allocate starts as NaN: an unwritten element fails."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}N{}r{}D{}Dv{}".format(*s))
def test_matches_reference(shape, dtype, poisoned):
    _check_against_reference(_inputs(*shape, dtype), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_without_L(dtype, poisoned):
    _check_against_reference(_inputs(2, 13, 7, 40, 24, dtype), dtype, return_L=False)


@needs_triton
def test_rows_of_L_sum_to_one():
    _, L = factorize(*_inputs(2, 197, 7, 40, 16, torch.float32), backend="triton")
    assert (L >= 0).all()
    torch.testing.assert_close(L.sum(-1), torch.ones(L.shape[:2], device=L.device), rtol=0, atol=1e-5)


@needs_triton
def test_non_contiguous_inputs_and_gradient():
    B, N, r, D, Dv = 2, 13, 7, 40, 24
    dense, sparse_q, sparse_v = _inputs(B, N, r, D, Dv, torch.float32)
    dense_t = dense.transpose(1, 2).contiguous().transpose(1, 2)  # strides (N*D, 1, N)
    sparse_q_s = torch.cat([sparse_q, sparse_q], dim=1)[:, ::2]  # row stride 2*D
    sparse_v_s = torch.stack([sparse_v, -sparse_v], dim=-1)[..., 0]  # last-dim stride 2
    assert not (dense_t.is_contiguous() or sparse_q_s.is_contiguous() or sparse_v_s.is_contiguous())
    _check_against_reference([dense_t, sparse_q_s, sparse_v_s], torch.float32)

    # An upstream gradient with stride 0 everywhere (what Z.sum() sends back).
    leaves = [t.detach().requires_grad_() for t in (dense_t, sparse_q_s, sparse_v_s)]
    factorize(*leaves, backend="triton", return_L=False)[0].sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (dense_t, sparse_q_s, sparse_v_s)]
    reference.factorize(*ref, 0.06, 1e-7)[0].sum().backward()
    for leaf, r_ in zip(leaves, ref):
        _close(leaf.grad, r_.grad, torch.float32, "grad with a stride-0 upstream gradient")


@needs_triton
def test_rank_128_and_wide_features():
    _check_against_reference(_inputs(1, 5, 128, 16, 16, torch.float32), torch.float32)
    _check_against_reference(_inputs(1, 3, 3, 2100, 2060, torch.float32), torch.float32)


@needs_triton
def test_rows_below_eps_are_clamped_like_the_reference():
    dense, sparse_q, sparse_v = _inputs(1, 13, 7, 16, 16, torch.float32)
    dense[0, 3] *= 1e-9  # norm below eps: divided by eps, no projection term
    sparse_q[0, 2] *= 1e-9
    _check_against_reference([dense, sparse_q, sparse_v], torch.float32, temperature=0.5)


@needs_triton
def test_mixed_input_dtypes_compute_in_dense_dtype():
    dense, sparse_q, sparse_v = _inputs(2, 13, 7, 40, 24, torch.float32)
    Z, L = factorize(dense.bfloat16(), sparse_q, sparse_v, backend="triton")
    assert Z.dtype == L.dtype == torch.bfloat16
    Zr, _ = reference.factorize(dense.double(), sparse_q.double(), sparse_v.double())
    _close(Z, Zr, torch.bfloat16, "Z")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("bias", [True, False])
def test_out_proj_matches_linear_of_Z(backend, bias):
    """L @ (V W^T) + b equals Linear(Z), values and gradients, W and b included."""
    B, N, r, D, Dv, Do = 2, 13, 7, 40, 24, 36
    inputs = _inputs(B, N, r, D, Dv, torch.float32)
    linear = torch.nn.Linear(Dv, Do, bias=bias).to(DEVICE)
    g = torch.Generator().manual_seed(3)
    dY = torch.randn(B, N, Do, generator=g, dtype=torch.float64).to(DEVICE)

    leaves = [t.detach().requires_grad_() for t in inputs]
    Y, _ = factorize(*leaves, backend=backend, out_proj=linear)
    (Y.double() * dY).sum().backward()

    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    W = linear.weight.detach().double().requires_grad_()
    b = linear.bias.detach().double().requires_grad_() if bias else None
    Zr, _ = reference.factorize(*ref_leaves)
    (F.linear(Zr, W, b) * dY).sum().backward()

    _close(Y, F.linear(Zr, W, b), torch.float32, "projected Z")
    for name, leaf, ref in zip(("dense", "sparse_q", "sparse_v"), leaves, ref_leaves):
        _close(leaf.grad, ref.grad, torch.float32, f"grad of {name}")
    _close(linear.weight.grad, W.grad, torch.float32, "grad of W")
    if bias:
        _close(linear.bias.grad, b.grad, torch.float32, "grad of b")


@needs_triton
def test_hypothesis_fuzz_shapes():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=8, deadline=None, derandomize=True)
    @hypothesis.given(
        B=st.integers(1, 2), N=st.integers(1, 70), r=st.integers(1, 20),
        D=st.integers(1, 90), Dv=st.integers(1, 90), seed=st.integers(0, 2**16),
    )
    def fuzz(B, N, r, D, Dv, seed):
        _check_against_reference(_inputs(B, N, r, D, Dv, torch.float32, seed=seed), torch.float32, seed=seed)

    fuzz()


@needs_triton
def test_custom_op_registration():
    """Schema, fake implementation and autograd registration as torch.library checks them."""
    dense, sparse_q, sparse_v = (t.requires_grad_() for t in _inputs(1, 13, 7, 16, 24, torch.float32))
    torch.library.opcheck(
        torch.ops.stellar.factorize_fwd.default, (dense, sparse_q, sparse_v, 0.06, 1e-7, True),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((2, 5, 16), (3, 4, 16), (2, 4, 8)), "batch mismatch"),
        (((2, 5, 16), (2, 4, 12), (2, 4, 8)), "width mismatch"),
        (((2, 5, 16), (2, 4, 16), (2, 3, 8)), "rank mismatch"),
        (((2, 5, 16), (2, 129, 16), (2, 129, 8)), "sparse_q has r=129"),
        (((2, 0, 16), (2, 4, 16), (2, 4, 8)), "dense must not be empty"),
        (((2, 5, 16), (2, 4, 16), (2, 4, 0)), "sparse_v must not be empty"),
        (((5, 16), (2, 4, 16), (2, 4, 8)), "dense must be 3-D"),
    ],
)
def test_bad_shapes_name_the_argument(shapes, match):
    tensors = [torch.randn(s) for s in shapes]
    with pytest.raises(ValueError, match=match):
        factorize(*tensors)


def test_bad_dtype_device_and_options_name_the_argument():
    dense, sparse_q, sparse_v = torch.randn(2, 5, 16), torch.randn(2, 4, 16), torch.randn(2, 4, 8)
    with pytest.raises(TypeError, match="sparse_q must be a floating-point"):
        factorize(dense, sparse_q.long(), sparse_v)
    with pytest.raises(TypeError, match="dense must be a floating-point"):
        factorize(dense.int(), sparse_q, sparse_v)
    with pytest.raises(ValueError, match="device mismatch.*sparse_v on meta"):
        factorize(dense, sparse_q, sparse_v.to("meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        factorize(dense, sparse_q, sparse_v, backend="cuda")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        factorize(dense, sparse_q, sparse_v, temperature=0.0)
    with pytest.raises(ValueError, match="out_proj weight"):
        factorize(dense, sparse_q, sparse_v, out_proj=torch.nn.Linear(9, 4))


def test_auto_uses_the_reference_off_cuda():
    dense, sparse_q, sparse_v = _inputs(2, 13, 7, 40, 24, torch.float64)
    if dense.is_cuda:
        pytest.skip("checks the CPU dispatch")
    Z, L = factorize(dense, sparse_q, sparse_v)
    Zr, Lr = reference.factorize(dense, sparse_q, sparse_v)
    torch.testing.assert_close(Z, Zr, rtol=0, atol=0)
    torch.testing.assert_close(L, Lr, rtol=0, atol=0)


def test_backend_info():
    info = backend_info()
    assert set(info) == {"triton_available", "triton_version", "interpreter", "cuda_available", "auto_backend"}
    assert info["interpreter"] == INTERPRET and info["cuda_available"] == CUDA
    assert info["auto_backend"] in ("triton", "torch")
    assert (info["triton_version"] is not None) == info["triton_available"]


# ----------------------------------------------------------------------------- the module


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_module_projects_then_factorizes(backend):
    from stellar.nn.factorization import SpatialSemanticFactorization

    torch.manual_seed(0)
    D, Dv = 40, 24
    module = SpatialSemanticFactorization(D, temperature=0.1, value_dim=Dv, backend=backend).to(DEVICE)
    assert {"dense_proj.weight", "dense_proj.bias", "sparse_proj.weight", "sparse_proj.bias"} == set(module.state_dict())
    dense, sparse, values = _inputs(2, 13, 7, D, Dv, torch.float32)
    Z, L = module(dense, sparse, values=values)
    Zr, Lr = reference.factorize(
        module.dense_proj(dense).double(), module.sparse_proj(sparse).double(), values.double(), 0.1
    )
    _close(Z, Zr.detach(), torch.float32, "Z")
    _close(L, Lr.detach(), torch.float32, "L")
    with pytest.raises(ValueError, match="value_dim=24"):
        module(dense, sparse)  # the default values (sparse) have width 40


@needs_triton
def test_launch_retries_with_smaller_tiles_when_out_of_resources(monkeypatch):
    """A device without the shared memory for a big tile gets a smaller BLOCK_N, same result."""
    import triton

    from stellar.kernels import factorize_triton as ft

    real = ft._factorize_fwd_kernel
    seen = []

    class SmallDevice:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["BLOCK_N"])
                if kwargs["BLOCK_N"] > 32:
                    raise triton.runtime.errors.OutOfResources(kwargs["BLOCK_N"] * 1024, 32 * 1024, "shared memory")
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(ft, "_factorize_fwd_kernel", SmallDevice())
    monkeypatch.setattr(ft, "_MAX_BLOCK_N", {})
    inputs = _inputs(1, 197, 7, 40, 24, torch.float32)
    Z, L = factorize(*inputs, backend="triton")
    Zr, Lr = reference.factorize(*(t.double() for t in inputs))
    assert seen[0] > 32 and seen[-1] == 32
    _close(Z, Zr, torch.float32, "Z")
    _close(L, Lr, torch.float32, "L")


@needs_triton
def test_gradients_when_only_L_reaches_the_loss():
    inputs = _inputs(2, 13, 7, 40, 24, torch.float32)
    leaves = [t.detach().requires_grad_() for t in inputs]
    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    weights = torch.randn(2, 13, 7, dtype=torch.float64).to(DEVICE)
    (factorize(*leaves, backend="triton")[1].double() * weights).sum().backward()
    (reference.factorize(*ref_leaves)[1] * weights).sum().backward()
    for name, leaf, ref in zip(("dense", "sparse_q"), leaves, ref_leaves):
        _close(leaf.grad, ref.grad, torch.float32, f"grad of {name}")
    assert leaves[2].grad is None or not leaves[2].grad.any()


def test_readme_example_runs():
    """The ten-line example of the README's factorization section runs as written."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?class ConceptHead.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    head = scope["ConceptHead"](dim=32, r=16)
    Z, L = head(torch.randn(2, 196, 32))
    assert Z.shape == (2, 196, 32) and L.shape == (2, 196, 16)
    torch.testing.assert_close(L.sum(-1), torch.ones(2, 196))

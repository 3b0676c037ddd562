"""The fused factorization against its float64 reference: forward, all gradients, awkward inputs.

The Triton path runs on CUDA tensors, or on CPU tensors in the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 where no GPU is present); without either those tests skip and say why.
"""
from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn.functional as F

from stellar.kernels import backend_info, factorize, reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA and not INTERPRET else "cpu"
needs_triton = pytest.mark.skipif(
    not backend_info()["triton_available"] or not (INTERPRET or CUDA),
    reason="the Triton kernels need triton and either a CUDA device or TRITON_INTERPRET=1 (tests/conftest.py sets it where no GPU is present)",
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


def test_auto_on_cuda_without_triton_warns_and_takes_the_reference(monkeypatch):
    """The one fallback of "auto" that is not by design (CUDA tensors, no Triton) says so, once."""
    from types import SimpleNamespace

    from stellar.kernels import _dispatch

    monkeypatch.setattr(_dispatch, "triton_available", lambda: False)
    monkeypatch.setattr(_dispatch, "_WARNED_NO_TRITON", set())
    cuda_bf16 = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="factorize: triton is not installed"):
        assert _dispatch.resolve_backend("factorize", "auto", cuda_bf16, "dense") == "torch"
    with pytest.raises(RuntimeError, match="needs the triton package"):
        _dispatch.resolve_backend("factorize", "triton", cuda_bf16, "dense")


def test_backend_info():
    info = backend_info()
    assert set(info) == {"triton_available", "triton_version", "interpreter", "cuda_available", "auto_backend",
                         "fp32_dots", "mix_precision", "tiles_tuned"}
    assert info["fp32_dots"] == ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee")
    assert set(info["mix_precision"]) == {"bfloat16", "float16"} and info["tiles_tuned"].endswith("of 48 entries")
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


class _FailingKernel:
    """Stands in for a @triton.jit kernel: raises `error(kwargs)` when it returns an exception
    (a device without the resources for that tile), otherwise launches the real kernel."""

    def __init__(self, real, error):
        self.real, self.error, self.seen = real, error, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append((kwargs["BLOCK_N"], kwargs.get("num_stages")))
            exc = self.error(kwargs)
            if exc is not None:
                raise exc
            return self.real[grid](*args, **kwargs)

        return launch


@needs_triton
@pytest.mark.parametrize("failure", ["OutOfResources", "driver"])
def test_launch_retries_with_smaller_tiles_when_out_of_resources(monkeypatch, failure):
    """A device without the resources for a big tile gets a smaller one (with a warning), same result."""
    import triton

    from stellar.kernels import factorize_triton as ft

    def error(kwargs):
        if kwargs["BLOCK_N"] <= 32:
            return None
        if failure == "OutOfResources":
            return triton.runtime.errors.OutOfResources(kwargs["BLOCK_N"] * 1024, 32 * 1024, "shared memory")
        return RuntimeError("Triton Error [CUDA]: too many resources requested for launch")

    fake = _FailingKernel(ft._fwd_kernel, error)
    monkeypatch.setattr(ft, "_fwd_kernel", fake)
    monkeypatch.setattr(ft, "_FALLBACK", {})
    inputs = _inputs(1, 197, 7, 40, 24, torch.float32)
    with pytest.warns(RuntimeWarning, match="the fwd kernel failed to launch"):
        Z, L = factorize(*inputs, backend="triton")
    Zr, Lr = reference.factorize(*(t.double() for t in inputs))
    assert fake.seen[0][0] == 64 and fake.seen[-1][0] == 32
    _close(Z, Zr, torch.float32, "Z")
    _close(L, Lr, torch.float32, "L")
    # the tile that worked is remembered: the next call launches it directly
    fake.seen.clear()
    factorize(*inputs, backend="triton")
    assert [n for n, _ in fake.seen] == [32]


@needs_triton
def test_launch_failures_that_a_smaller_tile_cannot_fix_are_raised(monkeypatch):
    from stellar.kernels import factorize_triton as ft

    fake = _FailingKernel(ft._fwd_kernel, lambda kwargs: RuntimeError("Triton Error [CUDA]: an illegal memory access"))
    monkeypatch.setattr(ft, "_fwd_kernel", fake)
    monkeypatch.setattr(ft, "_FALLBACK", {})
    with pytest.raises(RuntimeError, match="illegal memory access"):
        factorize(*_inputs(1, 13, 7, 40, 24, torch.float32), backend="triton")
    assert len(fake.seen) == 1


@needs_triton
@pytest.mark.parametrize("value", ["48", "8", "512", "sixty-four"])
def test_bad_block_n_knob_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("STELLAR_FACTORIZE_BLOCK_N", value)
    with pytest.raises(ValueError, match=rf"STELLAR_FACTORIZE_BLOCK_N must be a power of two in 16..256, got '{value}'"):
        factorize(*_inputs(1, 13, 7, 40, 24, torch.float32), backend="triton")


@needs_triton
def test_block_n_knob_sets_every_kernels_row_tile(monkeypatch):
    """BLOCK_N=16 makes 13 tiles of N=197 in every kernel: same result as the table's tiles."""
    monkeypatch.setenv("STELLAR_FACTORIZE_BLOCK_N", "16")
    from stellar.kernels import factorize_triton as ft

    assert {t[0] for k, t in ft.plan(torch.float32, 7, 40, 24).items() if k in ft.KERNELS} == {16}
    _check_against_reference(_inputs(1, 197, 7, 40, 24, torch.float32), torch.float32)


@needs_triton
def test_bad_mix_precision_knob_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("STELLAR_FACTORIZE_MIX_PRECISION", "fp8")
    with pytest.raises(ValueError, match="STELLAR_FACTORIZE_MIX_PRECISION must be one of"):
        factorize(*_inputs(1, 13, 7, 40, 24, torch.bfloat16), backend="triton")


@needs_triton
@pytest.mark.parametrize("mix", ["input", "tf32", "tf32x3", "ieee"])
def test_every_mix_precision_is_accurate_for_bf16(monkeypatch, mix):
    """Each choice of the MIX knob (what the GPU measurement will pick from) stays within the
    bf16 tolerance; the interpreter applies the GPU's operand rounding of that choice."""
    monkeypatch.setenv("STELLAR_FACTORIZE_MIX_PRECISION", mix)
    _check_against_reference(_inputs(2, 70, 16, 100, 72, torch.bfloat16), torch.bfloat16)


@needs_triton
def test_tile_table_is_checked(monkeypatch):
    from stellar.kernels import factorize_tiles, factorize_triton as ft

    key = ("bfloat16", 16, 512)
    bad = dict(factorize_tiles.TILES)
    bad[key] = dict(bad[key], dense=(48, 64, 4, 3))
    monkeypatch.setattr(factorize_tiles, "TILES", bad)
    monkeypatch.setattr(ft, "_TABLE_CHECKED", [False])
    with pytest.raises(ValueError, match=r"TILES\[\('bfloat16', 16, 512\)\]\['dense'\]: BLOCK_N=48 must be a power of two"):
        factorize(*_inputs(1, 13, 7, 40, 24, torch.bfloat16), backend="triton")


def test_tile_table_covers_every_key_and_renders_back():
    """Every (compute dtype, r bucket, D bucket) has an entry, and the writer of `tune --write`
    reproduces the file from the table."""
    import pathlib

    from stellar.kernels import factorize_tiles, factorize_triton as ft

    keys = {(d, r, w) for d in ft.COMPUTE_DTYPES for r in factorize_tiles.R_BUCKETS for w in factorize_tiles.D_BUCKETS}
    assert set(factorize_tiles.TILES) == keys
    ft._TABLE_CHECKED[0] = False
    ft._check_table()
    text = pathlib.Path(factorize_tiles.__file__).read_text()
    notes = {k: v for k, v in re.findall(r"^    (\(.*?\)): \{.*\},  # (.*)$", text, re.M)}
    notes = {eval(k): v for k, v in notes.items()}  # noqa: S307  keys are tuples of literals
    assert ft.render_table(factorize_tiles.TILES, factorize_tiles.MIX, notes) == text
    assert ft.table_key(torch.bfloat16, 16, 768, 512) == ("bfloat16", 16, 1024)
    assert ft.table_key(torch.float16, 7, 100, 2100) == ("float16", 16, None)
    assert ft.table_key(torch.bfloat16, 33, 384, 384) == ("bfloat16", 64, 512)


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # fp16's own 1e7 gradients
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_zero_rows_do_not_overflow_16_bit_operands(dtype, poisoned):
    """A patch and a key with norm 0 are clamped to eps (1/|x| = 1e7): the 16-bit dot operands
    stay unit-scale, so the other rows' and keys' gradients stay finite and right. (fp16 cannot
    hold the clamped row's and key's own gradients, ~1e7: those two are left out for fp16.)"""
    dense, sparse_q, sparse_v = _inputs(2, 13, 7, 40, 24, torch.float32)
    dense[0, 3] = 0.0
    sparse_q[1, 2] = 0.0
    inputs = [t.to(dtype) for t in (dense, sparse_q, sparse_v)]
    leaves = [t.detach().requires_grad_() for t in inputs]
    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    Z, L = factorize(*leaves, backend="triton")
    Zr, Lr = reference.factorize(*ref_leaves)
    g = torch.Generator().manual_seed(5)
    dZ = torch.randn(Zr.shape, generator=g, dtype=torch.float64).to(DEVICE)
    (Z.double() * dZ).sum().backward()
    (Zr * dZ).sum().backward()
    _close(Z, Zr, dtype, "Z")
    _close(L, Lr, dtype, "L")
    _close(leaves[2].grad, ref_leaves[2].grad, dtype, "grad of sparse_v")
    keep_rows, keep_keys = torch.ones(2, 13, dtype=torch.bool), torch.ones(2, 7, dtype=torch.bool)
    if dtype == torch.float16:
        keep_rows[0, 3] = keep_keys[1, 2] = False
    _close(leaves[0].grad[keep_rows], ref_leaves[0].grad[keep_rows], dtype, "grad of dense")
    _close(leaves[1].grad[keep_keys], ref_leaves[1].grad[keep_keys], dtype, "grad of sparse_q")


@pytest.fixture
def allow_tf32():
    """Sets torch.backends.cuda.matmul.allow_tf32 (a property monkeypatch cannot restore)."""
    was = torch.backends.cuda.matmul.allow_tf32

    def set_(value):
        torch.backends.cuda.matmul.allow_tf32 = value

    yield set_
    torch.backends.cuda.matmul.allow_tf32 = was


@needs_triton
def test_fp32_uses_tf32_when_torch_allows_it(allow_tf32):
    """allow_tf32 on: fp32 dots run on TF32 tensor cores (emulated in the interpreter: 10 mantissa
    bits), within TF32's error of the float64 reference but not within the IEEE tolerance."""
    from stellar.kernels import factorize_triton as ft

    allow_tf32(True)
    assert ft.table_key(torch.float32, 16, 768, 768)[0] == "float32-tf32"
    inputs = _inputs(2, 70, 16, 200, 72, torch.float32)
    Z, _ = factorize(*inputs, backend="triton")
    Zr, _ = reference.factorize(*(t.double() for t in inputs))
    err = ((Z.double() - Zr).abs().max() / Zr.abs().max()).item()
    assert 1e-6 < err < 5e-3, err  # TF32: far from fp32 exactness, well within 10 mantissa bits
    allow_tf32(False)
    Z, _ = factorize(*inputs, backend="triton")
    assert ((Z.double() - Zr).abs().max() / Zr.abs().max()).item() < 1e-5


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


@needs_triton
def test_tuning_sweep_writes_its_winners_back(monkeypatch, tmp_path):
    """The GPU tuning sweep (bench_factorization.py tune) without a GPU: a fake timer that
    prefers BLOCK_N 32 stands in for do_bench; the winners and the device land in the written
    table, which loads back and passes the table's checks."""
    import importlib.util
    import pathlib
    import sys

    from stellar.kernels import factorize_tiles, factorize_triton as ft

    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
    import bench_factorization

    monkeypatch.setattr(factorize_tiles, "TILES", {k: dict(v) for k, v in factorize_tiles.TILES.items()})
    key = ("float32", 16, 512)
    ran = set()

    def fake_bench(fn):
        tiles = factorize_tiles.TILES[key]
        if fn not in ran:  # each timed function really runs once (interpreter)
            ran.add(fn)
            fn()
        return 1.0 + sum(0.5 for t in tiles.values() if t[0] != 32) + 0.001 * sum(t[3] for t in tiles.values())

    out = tmp_path / "factorize_tiles.py"
    rows = bench_factorization.tune(100.0, str(out), keys=[(key, (1, 13, 16, 40, 24))], bench=fake_bench,
                                    device_name="Fake GPU 9000")
    assert [(k, kernel) for k, kernel, *_ in rows] == [(key, kernel) for kernel in ft.KERNELS]
    assert all(new[0] == 32 for *_, new, _ in rows)
    spec = importlib.util.spec_from_file_location("written_tiles", out)
    written = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(written)
    assert all(tile[0] == 32 for tile in written.TILES[key].values())
    assert written.TILES[("bfloat16", 16, 1024)] == factorize_tiles.TILES[("bfloat16", 16, 1024)]
    line = next(line for line in out.read_text().splitlines() if line.startswith(f"    {key!r}"))
    assert "# tuned" in line and "Fake GPU 9000" in line and "B1 N13 r16 D40 Dv24" in line
    monkeypatch.setattr(factorize_tiles, "TILES", written.TILES)
    monkeypatch.setattr(ft, "_TABLE_CHECKED", [False])
    ft._check_table()

"""The fused prototype cross-entropy against a float64 formula: loss, both gradients, awkward inputs.

The Triton path runs on CUDA tensors, or on CPU tensors in the interpreter (conftest sets
TRITON_INTERPRET=1 where no GPU is present); without either those tests skip and say why. The
tests of the kernels have "triton" in their names (`make gpu` selects them with -k triton).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from stellar.kernels import backend_info, prototype_cross_entropy, reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA and not INTERPRET else "cpu"
TRITON_OK = backend_info()["triton_available"] and (INTERPRET or CUDA)
needs_triton = pytest.mark.skipif(
    not TRITON_OK,
    reason="the Triton kernels need triton and either a CUDA device or TRITON_INTERPRET=1 (tests/conftest.py sets it where no GPU is present)",
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Max error relative to the largest reference magnitude; the reference gets the same (rounded) inputs.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
CASES = [  # M, K, C, T (None: no target_index, T = M)
    (1, 16, 7, 3),
    (1, 256, 4099, None),
    (37, 40, 1000, 5),
    (37, 256, 7, None),
    (300, 16, 1000, None),
    (300, 256, 7, 300),
]
BIG = (300, 40, 4099, 20)  # bf16 only: the interpreter takes seconds per dtype


def _inputs(M, K, C, T, dtype, gen, normalised=True):
    """features: unit rows [M, K]; prototypes: N(0, 1) [C, K] (STELLAR's init); targets [T, C]:
    peaked soft rows (summing to 1 when normalised); index [M] or None."""
    x = F.normalize(torch.randn(M, K, generator=gen, dtype=torch.float64), dim=-1)
    W = torch.randn(C, K, generator=gen, dtype=torch.float64)
    rows = M if T is None else T
    t = torch.softmax(3 * torch.randn(rows, C, generator=gen, dtype=torch.float64), -1)
    if not normalised:  # rows summing to anything, one all zero
        t = t * torch.rand(rows, 1, generator=gen, dtype=torch.float64) * 3
        t[0] = 0
    index = None if T is None else torch.randint(0, T, (M,), generator=gen)
    return x.to(DEVICE, dtype), W.to(DEVICE, dtype), t.float().to(DEVICE), index if index is None else index.to(DEVICE)


def _close(got, want, dtype, what):
    err = (got.double() - want).abs().max().item()
    scale = max(want.abs().max().item(), 1e-12)
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g} ({dtype})"


def _check_against_reference(x, W, t, index, dtype, gen, temperature=0.12, backend="triton"):
    """Loss and both gradients against the float64 formula, with a random upstream gradient."""
    g = torch.rand((), generator=gen, dtype=torch.float64).item() + 0.5
    xa, Wa = x.detach().requires_grad_(), W.detach().requires_grad_()
    loss = prototype_cross_entropy(xa, Wa, t, temperature, index, backend=backend)
    (loss * g).backward()
    xr, Wr = x.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    logits = xr @ Wr.t() / temperature
    tr = t.double() if index is None else t.double()[index]
    loss_r = -(tr * torch.log_softmax(logits, -1)).sum(-1).mean()
    (loss_r * g).backward()

    assert loss.dtype == torch.float32 and loss.shape == ()
    _close(loss, loss_r, dtype, "loss")
    assert xa.grad.dtype == dtype and Wa.grad.dtype == dtype
    _close(xa.grad, xr.grad, dtype, "grad of features")
    _close(Wa.grad, Wr.grad, dtype, "grad of prototypes")
    return xa.grad, Wa.grad


# On a GPU every new (shape class, dtype) compiles three kernels (seconds each): there, float32
# and float16 run on the first two cases only; the interpreter runs everything.
ON_GPU = CUDA and not INTERPRET
MATRIX = [(c, d) for c in CASES for d in DTYPES if not ON_GPU or d == torch.bfloat16 or c in CASES[:2]]


def _case_id(value):
    return "M{}K{}C{}T{}".format(*value) if isinstance(value, tuple) else str(value)


@needs_triton
@pytest.mark.parametrize("case, dtype", MATRIX, ids=_case_id)
def test_triton_matches_float64_formula(case, dtype, gen, poisoned):
    _check_against_reference(*_inputs(*case, dtype, gen), dtype, gen)


@needs_triton
def test_triton_many_rows_and_prototypes_with_an_index(gen, poisoned):
    _check_against_reference(*_inputs(*BIG, torch.bfloat16, gen), torch.bfloat16, gen)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_features_wider_than_one_chunk(dtype, gen, poisoned):
    """K = 300 > 256: the logits loop over K and each gradient comes in two column chunks."""
    _check_against_reference(*_inputs(5, 300, 33, 4, dtype, gen), dtype, gen)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_unnormalised_target_rows(dtype, gen, poisoned):
    """Rows summing to anything (one to zero): the gradient uses each row's sum, not 1."""
    _check_against_reference(*_inputs(37, 40, 1000, 6, dtype, gen, normalised=False), dtype, gen)


@needs_triton
@pytest.mark.parametrize("normalised", [True, False])
def test_triton_rows_of_the_logits_gradient_sum_to_zero(normalised, gen):
    """sum_c dS[m, c] = 0 for every row m (the loss ignores a shift of a row's logits), so the
    prototypes' gradient sums to zero over the prototypes: sum_c dW_c = sum_m (sum_c dS_mc) x_m / T."""
    x, W, t, index = _inputs(37, 40, 1000, 5, torch.float32, gen, normalised=normalised)
    W.requires_grad_()
    prototype_cross_entropy(x, W, t, 0.12, index, backend="triton").backward()
    column_sum = W.grad.double().sum(0).abs().max().item()
    assert W.grad.abs().max().item() > 1e-3  # a real gradient, not zeros
    assert column_sum <= 1e-5 * W.grad.abs().sum(0).max().item()


@needs_triton
def test_triton_strided_inputs_and_int32_index(gen, poisoned):
    x, W, t, index = _inputs(37, 40, 1000, 9, torch.float32, gen)
    x_s = x.t().contiguous().t()  # column-major
    W_s = torch.cat([W, W], dim=1)[:, ::2]  # column stride 2
    t_s = t.t().contiguous().t()  # targets column-major: the gather reads across rows
    index_s = torch.stack([index, index], 1).int()[:, 0]  # stride 2, int32
    assert not (x_s.is_contiguous() or W_s.is_contiguous() or t_s.is_contiguous() or index_s.is_contiguous())
    _check_against_reference(x_s, W_s, t_s, index_s, torch.float32, gen)


@needs_triton
@pytest.mark.parametrize("frozen", ["features", "prototypes"])
def test_triton_only_the_gradients_asked_for(frozen, gen):
    x, W, t, index = _inputs(37, 40, 100, 5, torch.float32, gen)
    xa = x.clone().requires_grad_(frozen != "features")
    Wa = W.clone().requires_grad_(frozen != "prototypes")
    prototype_cross_entropy(xa, Wa, t, 0.12, index, backend="triton").backward()
    xr, Wr = x.double().requires_grad_(), W.double().requires_grad_()
    reference.prototype_cross_entropy(xr, Wr, t.double(), 0.12, index).backward()
    live, ref = (Wa, Wr) if frozen == "features" else (xa, xr)
    dead = xa if frozen == "features" else Wa
    assert dead.grad is None
    _close(live.grad, ref.grad, torch.float32, f"grad with {frozen} frozen")


@needs_triton
def test_triton_mixed_dtypes_compute_in_the_features_dtype(gen):
    x, W, t, index = _inputs(37, 40, 100, 5, torch.float32, gen)
    Wa = W.clone().requires_grad_()
    loss = prototype_cross_entropy(x.bfloat16(), Wa, t.bfloat16(), 0.12, index, backend="triton")
    loss.backward()
    assert Wa.grad.dtype == torch.float32  # back through the cast to the weight's own dtype
    want = reference.prototype_cross_entropy(x.bfloat16().double(), W.bfloat16().double(), t.bfloat16().double(),
                                             0.12, index)
    _close(loss, want, torch.bfloat16, "loss")


@needs_triton
def test_triton_autocast_computes_in_the_autocast_dtype(gen):
    """Under autocast the op runs as the prototype Linear would: in the autocast dtype."""
    x, W, t, index = _inputs(37, 40, 100, 5, torch.float32, gen)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        under = prototype_cross_entropy(x, W, t, 0.12, index, backend="triton")
    explicit = prototype_cross_entropy(x.bfloat16(), W.bfloat16(), t, 0.12, index, backend="triton")
    full = prototype_cross_entropy(x, W, t, 0.12, index, backend="triton")
    assert under.item() == explicit.item()
    assert under.item() != full.item()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):  # the reference path follows the same rule
        under_ref = prototype_cross_entropy(x, W, t, 0.12, index, backend="torch")
    want = reference.prototype_cross_entropy(x.bfloat16().double(), W.bfloat16().double(), t.double(), 0.12, index)
    torch.testing.assert_close(under_ref.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_equals_the_clustering_head_and_soft_cross_entropy(backend, gen):
    """The wiring the model uses: features = normalize(mlp(x)), prototypes = the Linear's weight,
    targets of B images indexed per view, against today's head + repeat_interleave + soft CE."""
    from stellar.losses.clustering import soft_cross_entropy
    from stellar.model.heads import ClusteringHead

    torch.manual_seed(0)
    head = ClusteringHead(24, hidden=32, bottleneck=16, prototypes=50).to(DEVICE)
    B, G = 3, 4
    tokens = torch.randn(B * G, 24, device=DEVICE)
    targets = torch.softmax(torch.randn(B, 50, generator=gen) / 0.06, -1).to(DEVICE)
    index = torch.arange(B, device=DEVICE).repeat_interleave(G)
    want = soft_cross_entropy(head(tokens), targets.repeat_interleave(G, 0), 0.12)
    grads_want = torch.autograd.grad(want, list(head.parameters()))
    features = F.normalize(head.mlp(tokens), dim=-1, eps=1e-7)
    got = prototype_cross_entropy(features, head.prototypes.weight, targets, 0.12, index, backend=backend)
    grads_got = torch.autograd.grad(got, list(head.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- torch.library, compile


@needs_triton
def test_triton_custom_op_registration(gen):
    """Schema, fake implementations and autograd registration as torch.library checks them."""
    x, W, t, index = _inputs(37, 40, 100, 5, torch.float32, gen)
    x.requires_grad_()
    W.requires_grad_()
    torch.library.opcheck(
        torch.ops.stellar.prototype_ce_fwd.default, (x, W, t, index, 0.12),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    loss, stats = torch.ops.stellar.prototype_ce_fwd(x, W, t, index, 0.5)
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(
            torch.ops.stellar.prototype_ce_bwd.default,
            (torch.tensor(0.7, device=x.device), x.detach(), W.detach(), t, index, stats.detach(), 0.5, *need),
            test_utils=("test_schema", "test_faketensor"),
        )


@pytest.mark.parametrize(
    "backend, compiler",
    [
        ("torch", "aot_eager"),
        pytest.param("triton", "aot_eager", marks=needs_triton),
        pytest.param("triton", "inductor", marks=needs_triton),
    ],
)
def test_compiles_with_fullgraph(backend, compiler, gen):
    torch._dynamo.reset()
    x, W, t, index = _inputs(37, 40, 100, 5, torch.float32, gen)

    def step(x, W):
        f = F.normalize(x * 2.0, dim=-1)
        return 0.5 * prototype_cross_entropy(f, W, t, 0.12, index, backend=backend) + W.square().mean()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend=compiler)):
        xa, Wa = x.clone().requires_grad_(), W.clone().requires_grad_()
        loss = fn(xa, Wa)
        loss.backward()
        results.append((loss.detach(), xa.grad, Wa.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- errors and dispatch


def _small():
    return torch.randn(6, 8), torch.randn(5, 8), torch.rand(6, 5)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda x, W, t: (x[0], W, t), ValueError, "features must be 2-D"),
        (lambda x, W, t: (x[:0], W, t), ValueError, "features must not be empty"),
        (lambda x, W, t: (x, W[:, :7], t), ValueError, "width mismatch: prototypes has K=7, features has K=8"),
        (lambda x, W, t: (x, W, t[:, :4]), ValueError, r"targets must have C=5 columns"),
        (lambda x, W, t: (x, W, t[:4]), ValueError, "targets has T=4 rows but features has M=6"),
        (lambda x, W, t: (x.long(), W, t), TypeError, "features must be a floating-point"),
        (lambda x, W, t: (x, W.int(), t), TypeError, "prototypes must be a floating-point"),
        (lambda x, W, t: (x, W, t.long()), TypeError, "targets must be a floating-point"),
        (lambda x, W, t: (x, W, t.to("meta")), ValueError, "device mismatch.*targets on meta"),
        (lambda x, W, t: (x, W.to(torch.complex64), t), TypeError, "prototypes must be a floating-point"),
    ],
)
def test_bad_inputs_name_the_argument(change, error, match):
    with pytest.raises(error, match=match):
        prototype_cross_entropy(*change(*_small()))


def test_bad_index_and_options_name_the_argument():
    x, W, t = _small()
    t4 = t[:4]
    with pytest.raises(TypeError, match="target_index must be an int64 or int32"):
        prototype_cross_entropy(x, W, t4, target_index=torch.zeros(6))
    with pytest.raises(ValueError, match=r"target_index must have shape \[M=6\]"):
        prototype_cross_entropy(x, W, t4, target_index=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="device mismatch.*target_index on meta"):
        prototype_cross_entropy(x, W, t4, target_index=torch.zeros(6, dtype=torch.long, device="meta"))
    for bad in (torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([0, 1, -1, 3, 2, 0])):
        with pytest.raises(RuntimeError, match=r"target_index values must be in \[0, T=4\)"):
            prototype_cross_entropy(x, W, t4, target_index=bad)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        prototype_cross_entropy(x, W, t, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        prototype_cross_entropy(x, W, t, temperature=float("inf"))
    with pytest.raises(TypeError, match="temperature must be a Python number"):
        prototype_cross_entropy(x, W, t, temperature=torch.tensor(0.1))
    with pytest.raises(ValueError, match="backend must be one of"):
        prototype_cross_entropy(x, W, t, backend="cuda")
    with pytest.raises(TypeError, match="backend='triton' takes float32, bfloat16 or float16"):
        prototype_cross_entropy(x.double(), W.double(), t, backend="triton")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [None, 9])
def test_triton_one_program_loops_over_every_prototype_block(monkeypatch, gen, dtype, T):
    """One prototype range per row tile (no split), so each program's online log-sum-exp and
    target product run over many blocks with a rising max. On a 132-SM GPU the usual shapes
    split C into one block per program, which hid a loss 6% low (the H200, triton 3.6)."""
    from stellar.kernels import prototype_ce_triton as pt

    monkeypatch.setattr(pt, "_target_programs", lambda device: 1)
    x, W, t, index = _inputs(40, 32, 2000, T, dtype, gen)
    _check_against_reference(x, W, t, index, dtype, gen)


@needs_triton
def test_triton_bad_index_never_reaches_the_kernel_read(gen):
    """Called below the range check, an out-of-range index reads no targets (its row counts a
    zero target), rather than memory outside them."""
    x, W, t, _ = _inputs(6, 16, 7, 4, torch.float32, gen)
    index = torch.tensor([0, 1, 9, 3, -2, 2], device=x.device)
    loss, stats = torch.ops.stellar.prototype_ce_fwd(x, W, t, index, 0.12)
    want = t.double().sum(1)[index.clamp(0, 3)] * ((index >= 0) & (index < 4))
    torch.testing.assert_close(stats[2].double(), want, rtol=1e-6, atol=0)


@pytest.mark.skipif(not CUDA or INTERPRET, reason="the CUDA path: needs a GPU (and no TRITON_INTERPRET)")
def test_triton_on_cuda_by_default_without_a_host_sync(gen):
    """auto takes the kernels for CUDA tensors, and loss + backward never synchronize the host
    (the index range is a device-side assertion; the upstream gradient is read on the device)."""
    from stellar.kernels.prototype_ce import _resolve_backend

    x, W, t, index = _inputs(300, 256, 4099, 20, torch.bfloat16, gen)
    assert _resolve_backend("auto", x) == "triton"
    x.requires_grad_()
    W.requires_grad_()
    prototype_cross_entropy(x, W, t, 0.12, index).backward()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (prototype_cross_entropy(x, W, t, 0.12, index) * 2).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_auto_uses_the_reference_off_cuda(gen):
    x, W, t, index = _inputs(37, 40, 100, 5, torch.float64, gen)
    if x.is_cuda:
        pytest.skip("checks the CPU dispatch")
    got = prototype_cross_entropy(x, W, t, 0.12, index)
    want = reference.prototype_cross_entropy(x, W, t, 0.12, index)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_triton
def test_triton_launch_retries_with_smaller_tiles_when_out_of_resources(monkeypatch, gen):
    """A device without the shared memory for a big tile gets fewer stages / a smaller block, same result."""
    import triton

    from stellar.kernels import prototype_ce_triton as pt

    real = pt._fwd_kernel
    seen = []

    class SmallDevice:  # too small for the first prototype block the launcher picks (any stage count)
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["BLOCK_C"])
                if kwargs["BLOCK_C"] >= seen[0]:
                    raise triton.runtime.errors.OutOfResources(kwargs["BLOCK_C"] * 1024, 16 * 1024, "shared memory")
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(pt, "_fwd_kernel", SmallDevice())
    monkeypatch.setattr(pt, "_CAPS", {})
    x, W, t, index = _inputs(37, 40, 1000, 5, torch.float32, gen)
    with pytest.warns(RuntimeWarning, match="the fwd kernel failed to launch with BLOCK_C="):
        loss = prototype_cross_entropy(x, W, t, 0.12, index, backend="triton")
    assert seen[0] >= 32 and seen[-1] == seen[0] // 2  # fewer stages first on a GPU, then the block
    _close(loss, reference.prototype_cross_entropy(x.double(), W.double(), t.double(), 0.12, index),
           torch.float32, "loss")
    assert pt._CAPS[("fwd", torch.float32, 64)]["BLOCK_C"] == seen[0] // 2


@needs_triton
@pytest.mark.parametrize("value", ["48", "8", "sixty-four"])
def test_triton_bad_block_knob_is_a_clear_error(monkeypatch, gen, value):
    monkeypatch.setenv("STELLAR_PROTOTYPE_CE_BLOCK_C", value)
    x, W, t, index = _inputs(5, 16, 40, 3, torch.float32, gen)
    with pytest.raises(ValueError, match=rf"STELLAR_PROTOTYPE_CE_BLOCK_C must be a power of two in 16..256, got '{value}'"):
        prototype_cross_entropy(x, W, t, 0.12, index, backend="triton")


def test_readme_example_runs():
    """The example of the README's prototype cross-entropy section runs as written (reference
    path on CPU) and gives the formula's value."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n([^`]*?prototype_cross_entropy\(z,[^`]*?)```", text, re.S).group(1)
    scope: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), scope)
    z, W, t, index = scope["z"], scope["prototypes"], scope["targets"], scope["index"]
    assert z.grad is not None and W.grad is not None
    want = reference.prototype_cross_entropy(z.detach().double(), W.detach().double(), t.double(), 0.12, index)
    torch.testing.assert_close(scope["loss"].double(), want, rtol=1e-5, atol=0)

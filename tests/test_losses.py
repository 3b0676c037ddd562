"""The losses of STELLAR.md sections 3-5 against direct float64 formulas written here.

The references below are written from the spec with explicit loops (small shapes), not by
calling the implementation's helpers, so a wrong order of normalisations, a wrong
temperature or a wrong neighbour would show.
"""
import math
import os

import numpy as np
import pytest
import torch

from stellar.losses import (koleo_loss, match_tokens, pixel_loss, sinkhorn_knopp, soft_cross_entropy,
                            token_loss, transport_plan)

f64 = torch.float64


# ----------------------------------------------------------------------------- references
def ref_sinkhorn(logits, temperature=0.06, iterations=3, eps=1e-8, offset=50.0):
    """The public implementation's formula, written independently in NumPy float64:
    S = logits / T; Q = exp(S - (per-column max of S) + offset); then `iterations` x (divide by
    column sums + eps, divide by row sums + eps). offset is 50 (0 for float16 logits)."""
    S = np.asarray(logits.detach().double().numpy(), dtype=np.float64) / temperature
    Q = np.exp(S - S.max(axis=0, keepdims=True) + offset)
    for _ in range(iterations):
        Q = Q / (Q.sum(axis=0, keepdims=True) + eps)
        Q = Q / (Q.sum(axis=1, keepdims=True) + eps)
    return torch.from_numpy(Q)


def head_logits(M, C, gen, K=256):
    """Logits shaped as the clustering head makes them: L2-normalised K-d features against
    std-1 prototypes (each logit ~ N(0, 1), so logits / 0.06 spreads over ~+-50)."""
    features = torch.nn.functional.normalize(torch.randn(M, K, generator=gen, dtype=f64), dim=1)
    return features @ torch.randn(C, K, generator=gen, dtype=f64).T


def ref_soft_ce(logits, targets, temperature=0.12):
    """mean over rows of -sum_c t_c log softmax(logits / T)_c, by loops."""
    rows = []
    for l_row, t_row in zip(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, logits.shape[-1])):
        z = l_row / temperature
        lse = torch.log(torch.exp(z - z.max()).sum()) + z.max()
        rows.append(-sum(t_row[c] * (z[c] - lse) for c in range(len(z))))
    return torch.stack(rows).mean()


def ref_plan(pred, target, epsilon=0.1, iterations=5):
    """Sinkhorn in the scaling (non-log) domain: u = a / (K v), v = b / (K^T u), K = exp(-C/eps)."""
    out = []
    for p, t in zip(pred, target):
        r, rt = p.shape[0], t.shape[0]
        C = torch.tensor([[math.sqrt(sum((float(p[i, d]) - float(t[j, d])) ** 2 for d in range(p.shape[1])))
                           for j in range(rt)] for i in range(r)], dtype=f64)
        K = torch.exp(-C / epsilon)
        a, b = torch.full((r,), 1 / r, dtype=f64), torch.full((rt,), 1 / rt, dtype=f64)
        v = torch.ones(rt, dtype=f64)
        for _ in range(iterations):
            u = a / (K @ v)
            v = b / (K.t() @ u)
        out.append(u[:, None] * K * v[None, :])
    return torch.stack(out)


def ref_koleo(x, eps=1e-8):
    """Brute force: for every token, scan the other tokens of its image for the largest dot."""
    terms = []
    for img in x:
        n = img / img.norm(dim=-1, keepdim=True)
        for i in range(len(n)):
            best, best_j = -math.inf, None
            for j in range(len(n)):
                dot = float((n[i] @ n[j]).detach())
                if j != i and dot > best:
                    best, best_j = dot, j
            terms.append(-torch.log(0.5 * (n[i] - n[best_j]).norm() + eps))
    return torch.stack(terms).mean()


# ----------------------------------------------------------------------------- Sinkhorn-Knopp
@pytest.mark.parametrize("M,C", [(7, 5), (3, 11), (16, 16), (1, 4)])
@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn_matches_formula(M, C, iterations, gen):
    logits = torch.randn(M, C, generator=gen, dtype=f64) * 0.2
    got = sinkhorn_knopp(logits, iterations=iterations)
    assert got.dtype == f64 and got.shape == (M, C)
    torch.testing.assert_close(got, ref_sinkhorn(logits, iterations=iterations), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("M,C", [(2048, 16384), (37, 16384), (2048, 1000), (37, 1000)])
def test_sinkhorn_at_the_heads_real_scale(M, C, gen):
    """At the head's real scale most prototypes score far below the best one: a single global
    shift leaves their columns under eps (targets off by up to ~0.75); the per-column shift of
    the public code does not. float32 (what the model runs) against the float64 formula."""
    logits = head_logits(M, C, gen)
    ref = ref_sinkhorn(logits)
    got = sinkhorn_knopp(logits.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(sinkhorn_knopp(logits), ref, rtol=1e-9, atol=1e-12)   # float64 stays float64
    # Balance: every column near M / C after 3 iterations (the raw softmax is far from it), and
    # no column left unnormalised (a global shift leaves some at ~1e-7 of their share).
    share = got.double().sum(0) * C / M
    raw = torch.softmax(logits / 0.06, dim=1).sum(0) * C / M
    assert share.min() > 0.05 and share.max() < 5.0, (share.min(), share.max())
    assert share.std() < 0.6 * raw.std()
    torch.testing.assert_close(got.sum(1), torch.ones(M), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-2)])
def test_sinkhorn_low_precision_inputs_compute_in_fp32(dtype, tol, gen):
    logits = head_logits(9, 6, gen).to(dtype)
    got = sinkhorn_knopp(logits)
    assert got.dtype == torch.float32
    offset = 0.0 if dtype == torch.float16 else 50.0                     # the public code's + 0 for fp16
    torch.testing.assert_close(got.double(), ref_sinkhorn(logits.double(), offset=offset), rtol=tol, atol=tol)


def test_sinkhorn_marginals(gen):
    M, C = 64, 8
    logits = torch.randn(M, C, generator=gen, dtype=f64) * 0.1
    t = sinkhorn_knopp(logits)
    torch.testing.assert_close(t.sum(1), torch.ones(M, dtype=f64))      # rows: exactly 1
    assert (t >= 0).all()
    uniform = M / C
    raw = torch.softmax(logits / 0.06, dim=1).sum(0)                     # no balancing
    assert (t.sum(0) - uniform).abs().max() < 0.5 * (raw - uniform).abs().max()
    assert (t.sum(0) - uniform).abs().max() < 0.1 * uniform
    long = sinkhorn_knopp(logits, iterations=200)                         # converged: uniform
    torch.testing.assert_close(long.sum(0), torch.full((C,), uniform, dtype=f64), rtol=1e-6, atol=1e-6)


def test_sinkhorn_is_shift_invariant_and_finite_for_large_logits(gen):
    logits = torch.randn(12, 7, generator=gen, dtype=f64) * 0.2
    base = sinkhorn_knopp(logits)
    big = sinkhorn_knopp(logits + 100.0)         # exp(100 / 0.06) overflows float64 unshifted
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big, base, rtol=1e-9, atol=1e-12)


def test_sinkhorn_carries_no_gradient_and_ignores_autocast(gen):
    logits = torch.randn(10, 6, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = sinkhorn_knopp(logits)
    assert not t.requires_grad and t.dtype == torch.float32
    torch.testing.assert_close(t.double(), ref_sinkhorn(logits.detach().double()), rtol=1e-5, atol=1e-6)


def _sinkhorn_rank(rank, world, path, logits, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        rows = logits.chunk(world)[rank]
        out[rank] = sinkhorn_knopp(rows)
    finally:
        dist.destroy_process_group()


def test_sinkhorn_distributed_equals_full_batch(tmp_path, gen):
    """Two gloo ranks, each with half the rows, produce the full batch's targets."""
    import torch.multiprocessing as mp
    logits = head_logits(10, 5, gen).float()
    logits[7, :3] += 2.0                  # some column maxima sit on rank 1: they must be all-reduced
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_sinkhorn_rank, args=(2, str(tmp_path / "init"), logits, out), nprocs=2, join=True)
    got = torch.cat([out[0], out[1]])
    torch.testing.assert_close(got, sinkhorn_knopp(logits), rtol=1e-5, atol=1e-7)


def test_sinkhorn_rejects_bad_input():
    with pytest.raises(ValueError, match="logits"):
        sinkhorn_knopp(torch.randn(3, 4, 5))
    with pytest.raises(TypeError, match="logits"):
        sinkhorn_knopp(torch.randint(0, 3, (3, 4)))
    with pytest.raises(ValueError, match="temperature"):
        sinkhorn_knopp(torch.randn(3, 4), temperature=0.0)


# ----------------------------------------------------------------------------- soft CE
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 9), (1, 1)])
def test_soft_cross_entropy_matches_formula_and_gradient(shape, gen):
    logits = torch.randn(*shape, generator=gen, dtype=f64, requires_grad=True)
    targets = torch.softmax(torch.randn(*shape, generator=gen, dtype=f64), dim=-1)
    got = soft_cross_entropy(logits, targets)
    ref_in = logits.detach().clone().requires_grad_(True)
    ref = ref_soft_ce(ref_in, targets)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    upstream = torch.rand((), generator=gen, dtype=f64) + 0.5
    (g,) = torch.autograd.grad(got * upstream, logits)
    (rg,) = torch.autograd.grad(ref * upstream, ref_in)
    torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-12)


def test_soft_cross_entropy_bf16_and_no_target_grad(gen):
    logits = torch.randn(6, 10, generator=gen).to(torch.bfloat16)
    targets = torch.softmax(torch.randn(6, 10, generator=gen), -1).requires_grad_(True)
    got = soft_cross_entropy(logits, targets)
    assert got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got.double(), ref_soft_ce(logits.double(), targets.detach().double()),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="targets"):
        soft_cross_entropy(logits, targets[:, :5])


# ----------------------------------------------------------------------------- OT matching
@pytest.mark.parametrize("B,r,D", [(3, 16, 8), (2, 5, 3), (1, 2, 4)])
def test_matcher_recovers_known_permutation(B, r, D, gen):
    target = torch.randn(B, r, D, generator=gen)
    perms = torch.stack([torch.randperm(r, generator=gen) for _ in range(B)])        # B x r
    pred = torch.gather(target, 1, perms[..., None].expand(-1, -1, D))
    pred = pred + 0.02 * torch.randn(B, r, D, generator=gen)
    match = match_tokens(pred, target)
    assert match.dtype == torch.int64 and match.shape == (B, r)
    assert torch.equal(match, perms)


@pytest.mark.parametrize("r,rt", [(6, 6), (4, 7)])
def test_transport_plan_matches_scaling_sinkhorn(r, rt, gen):
    pred = torch.randn(2, r, 3, generator=gen, dtype=f64) * 0.5
    target = torch.randn(2, rt, 3, generator=gen, dtype=f64) * 0.5
    P = transport_plan(pred, target)
    ref = ref_plan(pred, target)
    torch.testing.assert_close(P, ref, rtol=1e-9, atol=1e-12)
    # after the final dual update on g the columns carry exactly the target marginal
    torch.testing.assert_close(P.sum(1), torch.full((2, rt), 1 / rt, dtype=f64))
    match, plan = match_tokens(pred, target, return_plan=True)
    torch.testing.assert_close(plan, P)
    assert torch.equal(match, ref.argmax(2))


def test_transport_plan_fp32_vs_fp64_and_no_grad(gen):
    pred = torch.randn(2, 8, 16, generator=gen, requires_grad=True)
    target = torch.randn(2, 8, 16, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        P = transport_plan(pred, target)
    assert P.dtype == torch.float32 and not P.requires_grad and torch.isfinite(P).all()
    torch.testing.assert_close(P.double(), transport_plan(pred.detach().double(), target.double()),
                               rtol=1e-4, atol=1e-7)


def test_matcher_rejects_bad_input():
    with pytest.raises(ValueError, match="pred"):
        match_tokens(torch.randn(4, 3), torch.randn(1, 4, 3))
    with pytest.raises(ValueError, match="share"):
        match_tokens(torch.randn(2, 4, 3), torch.randn(1, 4, 3))
    with pytest.raises(ValueError, match="epsilon"):
        match_tokens(torch.randn(1, 4, 3), torch.randn(1, 4, 3), epsilon=0)


# ----------------------------------------------------------------------------- KoLeo
@pytest.mark.parametrize("B,r,D", [(2, 5, 4), (3, 16, 8), (1, 2, 3)])
def test_koleo_matches_brute_force_with_gradient(B, r, D, gen):
    x = torch.randn(B, r, D, generator=gen, dtype=f64, requires_grad=True)
    got = koleo_loss(x)
    xr = x.detach().clone().requires_grad_(True)
    ref = ref_koleo(xr)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    upstream = torch.rand((), generator=gen, dtype=f64) + 0.5
    (g,) = torch.autograd.grad(got * upstream, x)
    (rg,) = torch.autograd.grad(ref * upstream, xr)
    torch.testing.assert_close(g, rg, rtol=1e-8, atol=1e-10)


def test_koleo_low_precision(gen):
    x = torch.randn(2, 6, 5, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = koleo_loss(x.to(torch.bfloat16))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_koleo(x.to(torch.bfloat16).double()), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="r >= 2"):
        koleo_loss(torch.randn(2, 1, 5))


def test_koleo_coincident_tokens_stay_finite(gen):
    """Two identical tokens: distance 0, loss -log(1e-8) for them, gradients finite."""
    x = torch.randn(1, 4, 5, generator=gen, dtype=f64)
    x[0, 1] = x[0, 0] * 2.0                                     # same direction after normalizing
    x.requires_grad_(True)
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss, ref_koleo(x.detach()))


# ----------------------------------------------------------------------------- reconstruction
def test_pixel_loss_matches_formula(gen):
    pred = torch.randn(2, 3, 4, 5, generator=gen, dtype=f64, requires_grad=True)
    target = torch.rand(2, 3, 4, 5, generator=gen, dtype=f64)
    got = pixel_loss(pred, target)
    ref = sum((float(p) - float(t)) ** 2 for p, t in zip(pred.detach().flatten(), target.flatten())) / pred.numel()
    assert abs(got.item() - ref) < 1e-12
    (g,) = torch.autograd.grad(got, pred)
    torch.testing.assert_close(g, 2 * (pred.detach() - target) / pred.numel())
    with pytest.raises(ValueError, match="same shape"):
        pixel_loss(pred, target[:, :2])


@pytest.mark.parametrize("code_shape", ["flat", "grid"])
def test_token_loss_matches_formula(code_shape, gen):
    B, h, w, V = 2, 2, 3, 11
    logits = torch.randn(B, h * w, V, generator=gen, dtype=f64, requires_grad=True)
    codes = torch.randint(0, V, (B, h, w), generator=gen)
    got = token_loss(logits, codes.view(B, h * w) if code_shape == "flat" else codes)
    flat = codes.view(B, h * w)
    terms = []
    for b in range(B):
        for n in range(h * w):
            z = logits[b, n].detach()
            terms.append(-(float(z[flat[b, n]]) - math.log(sum(math.exp(float(v)) for v in z))))
    assert abs(got.item() - sum(terms) / len(terms)) < 1e-12
    (g,) = torch.autograd.grad(got, logits)
    onehot = torch.nn.functional.one_hot(flat, V).to(f64)
    torch.testing.assert_close(g, (torch.softmax(logits.detach(), -1) - onehot) / (B * h * w))
    with pytest.raises(ValueError, match="codes"):
        token_loss(logits, codes.float())
    with pytest.raises(ValueError, match="codes"):
        token_loss(logits, flat[:, :3])

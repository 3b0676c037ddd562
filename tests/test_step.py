"""The training step's levers (stellar/train/step.py): the sync-free update equals the reference
update and skips a non-finite one on the device, the losses are read in blocks, torch.compile of
the pieces does not recompile, fp8 refuses the CPU, the prefetcher keeps the loader position.
Tiny shapes, CPU (aot_eager for compile); the CUDA tests run under `make gpu`."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stellar.model import LOSS_NAMES, build_model
from stellar.model.masking import sample_keep_indices
from stellar.train.step import (HOST_KEYS, LossTracker, Prefetcher, StepOptions, build_optimizer, convert_fp8,
                                first_non_finite, fp8_modules, non_finite_message, prepare_model, to_device,
                                update_with_sync, update_without_sync)
from stellar.train.trainer import forward_losses

TINY = dict(arch="tiny", img_size=32, patch_size=8, dim=32, depth=2, heads=2, num_tokens=4,
            decoder=dict(dim=16, depth=1, heads=2, mlp_dim=32),
            clustering=dict(hidden=16, bottleneck=8, prototypes=40), masking=dict(mask_ratio=0.75))
TRAIN = {"lr": 1e-2, "weight_decay": 0.04, "betas": [0.9, 0.999]}


def _batch(gen, B=2, G=2, Lc=2, dtype=torch.float32):
    return {"image": torch.rand(B, 3, 32, 32, generator=gen, dtype=dtype),
            "global_views": torch.rand(B, G, 3, 32, 32, generator=gen, dtype=dtype),
            "local_views": torch.rand(B, Lc, 3, 16, 16, generator=gen, dtype=dtype),
            "keep": torch.stack([sample_keep_indices(B, 4, 4, 0.75, generator=gen) for _ in range(G)], 1)}


def _model(seed=0, dtype=torch.float32, **over):
    torch.manual_seed(seed)
    return build_model({**TINY, **over}).to(dtype)


def _opts(**train):
    return StepOptions.from_config(train, torch.device("cpu"))


# --------------------------------------------------------------------------- options

def test_options_resolve_auto_and_refuse_impossible_mixes():
    opts = _opts()
    assert opts.sync_free and opts.fused_adamw and not opts.compile and not opts.prefetch and not opts.fp8
    ref = _opts(sync_free=False, fused_adamw=False)
    assert not ref.sync_free and not ref.fused_adamw
    for train, key in (({"cuda_graphs": True}, "cuda_graphs"), ({"fused_adamw": False}, "fused_adamw"),
                       ({"prefetch": True}, "prefetch"), ({"compile": "yes"}, "compile"), ({"fp8": True}, "fp8")):
        with pytest.raises(ValueError, match=key):
            _opts(**train)


def test_fp8_refuses_the_cpu_with_a_clear_message():
    model = _model()
    with pytest.raises(ValueError, match=r"train\.fp8.*CUDA.*8\.9"):
        _opts(fp8=True)
    with pytest.raises(ValueError, match="train.fp8"):
        convert_fp8(model)
    names = fp8_modules(_model(dim=32, decoder=dict(dim=32, depth=1, heads=2, mlp_dim=64)))
    assert names and all(".blocks." in f".{n}" for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"qkv", "proj", "fc1", "fc2"}
    assert not any("head" in n or "factorization" in n for n in names)


# --------------------------------------------------------------------------- the update

def _steps(model, batches, optimizer, sync_free, clip=1.0):
    norms, losses = [], []
    for batch in batches:
        out = forward_losses(model, batch, None)
        if sync_free:
            norm, _ = update_without_sync(out["loss"], optimizer, clip)
        else:
            norm = update_with_sync(out["loss"], optimizer, clip)
        norms.append(norm)
        losses.append(out["loss"].detach())
    return torch.stack(losses), torch.stack(norms)


def test_sync_free_update_equals_the_reference_update(gen):
    """Fused AdamW with the device-side clip gives the foreach AdamW + clip_grad_norm_ trajectory."""
    batches = [_batch(gen) for _ in range(3)]
    ref, fast = _model(dtype=torch.float64), _model(dtype=torch.float64)
    ref_opt = build_optimizer(ref, TRAIN, _opts(sync_free=False, fused_adamw=False))
    fast_opt = build_optimizer(fast, TRAIN, _opts())
    assert fast_opt.defaults["fused"] and not ref_opt.defaults.get("fused")
    l_ref, n_ref = _steps(ref, batches, ref_opt, False, clip=0.5)
    l_fast, n_fast = _steps(fast, batches, fast_opt, True, clip=0.5)
    assert (n_ref > 0.5).all()                                   # the clip acted
    torch.testing.assert_close(l_fast, l_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(n_fast, n_ref, rtol=1e-9, atol=1e-12)
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_a_non_finite_step_is_skipped_on_the_device(gen, poison):
    model = _model()
    opt = build_optimizer(model, TRAIN, _opts())
    _steps(model, [_batch(gen)], opt, True)                       # one good step: moments exist
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model.encoder.sparse_tokens].items()}
    out = forward_losses(model, _batch(gen), None)
    loss = out["loss"] * float("nan") if poison == "loss" else out["loss"] + 0 * model.encoder.sparse_tokens.sum() / 0
    norm, found_inf = update_without_sync(loss, opt, 1.0)
    assert float(found_inf) == 1.0 and not math.isfinite(float(norm))
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    for k, v in opt.state[model.encoder.sparse_tokens].items():
        assert torch.equal(v, state[k]), k                         # moments and step count untouched
    _, found_inf = update_without_sync(forward_losses(model, _batch(gen), None)["loss"], opt, 1.0)
    assert float(found_inf) == 0.0
    assert not torch.equal(params[0], next(model.parameters()))
    assert float(opt.state[model.encoder.sparse_tokens]["step"]) == float(state["step"]) + 1


class _HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host (.item(), bool(), int(), .tolist())."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
                    torch.ops.aten.is_nonzero.default):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_fast_step_reads_nothing_on_the_host_between_reads(gen):
    """forward, sync-free update and tracker.add of 3 steps: no value read on the host (the CPU
    proxy of the CUDA sync-debug test); the reference update's host read is caught by the same
    probe, and the tracker's read() is the one place values come back."""
    model = _model()
    opt = build_optimizer(model, TRAIN, _opts())
    batches = [_batch(gen) for _ in range(3)]
    tracker = LossTracker(LOSS_NAMES, 3, torch.device("cpu"))
    # The range check of batch["keep"] reads it on the host for CPU tensors only (free there, skipped
    # on CUDA): take it out of this probe, which stands in for a CUDA run.
    model._keep_indices = lambda keep, *a: keep.flatten(0, 1)
    model.encoder.check = lambda images, keep=None: None
    probe = _HostReads()
    with probe:
        for step, batch in enumerate(batches, 1):
            out = forward_losses(model, batch, None)
            norm, _ = update_without_sync(out["loss"], opt, 1.0)
            tracker.add(step, out, norm)
    assert probe.reads == [], probe.reads
    rows = tracker.read()
    assert [s for s, _ in rows] == [1, 2, 3] and all(math.isfinite(v["loss"]) for _, v in rows)
    ref_probe = _HostReads()
    with ref_probe:
        out = forward_losses(model, batches[0], None)
        math.isfinite(float(out["loss"].detach()))               # what the reference loop does each step
    assert ref_probe.reads


def test_loss_tracker_keeps_order_and_finds_the_first_non_finite_step():
    tracker = LossTracker(["a", "b"], 4, torch.device("cpu"))
    vals = [(1.0, 2.0, 3.0), (4.0, float("inf"), 5.0), (float("nan"), 1.0, 1.0)]
    for step, (total, a, b) in enumerate(vals, 7):
        out = {"loss": torch.tensor(total), "losses": {"a": torch.tensor(a), "b": torch.tensor(b)}}
        tracker.add(step, out, torch.tensor(1.5))
    assert len(tracker) == 3 and not tracker.full
    rows = tracker.read()
    assert [s for s, _ in rows] == [7, 8, 9] and rows[0][1] == {"loss": 1.0, "a": 2.0, "b": 3.0}
    assert tracker.last_norms == [1.5, 1.5, 1.5] and len(tracker) == 0
    assert first_non_finite(rows) == 2                               # the total decides ...
    assert first_non_finite(rows, [1.0, float("nan"), 1.0]) == 1     # ... or the gradient norm
    msg = non_finite_message(9, rows[2][1], None, stopped_at=10, skipped=True)
    assert "step 9" in msg and "loss=nan" in msg and "skipped" in msg and "step 10" in msg
    with pytest.raises(RuntimeError, match="read"):
        for _ in range(5):
            tracker.add(1, {"loss": torch.tensor(0.0), "losses": {"a": torch.tensor(0.0), "b": torch.tensor(0.0)}})


# --------------------------------------------------------------------------- compile

def test_compiled_step_does_not_recompile_and_matches_eager(gen):
    """train.compile (aot_eager here): the first step compiles one graph per piece and shape; the
    2nd and 3rd steps reuse them (dynamo counters unchanged, recompiling is an error); the
    compiled step's losses and updates equal the eager step's."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    batches = [_batch(gen) for _ in range(3)]
    eager, compiled = _model(), _model()
    prepare_model(compiled, _opts(compile=True, compile_backend="aot_eager"))
    opt_e, opt_c = (build_optimizer(m, TRAIN, _opts()) for m in (eager, compiled))
    l_eager, _ = _steps(eager, batches[:1], opt_e, True)
    counters.clear()
    l_comp, _ = _steps(compiled, batches[:1], opt_c, True)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 5 and not counters["graph_break"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        l2_comp, _ = _steps(compiled, batches[1:], opt_c, True)
    assert counters["stats"]["unique_graphs"] == graphs and not counters["recompiles"]
    l2_eager, _ = _steps(eager, batches[1:], opt_e, True)
    torch.testing.assert_close(torch.cat([l_comp, l2_comp]), torch.cat([l_eager, l2_eager]), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(compiled.named_parameters(), eager.parameters()):
        if name.endswith("attn.qkv.bias"):
            # The key bias has zero gradient in exact arithmetic (softmax ignores a constant per
            # query): Adam turns its rounding noise into +-lr steps, different in both runs.
            D = a.shape[0] // 3
            a, b = torch.cat([a[:D], a[2 * D:]]), torch.cat([b[:D], b[2 * D:]])
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert list(dict(compiled.state_dict())) == list(dict(eager.state_dict()))   # names unchanged
    torch._dynamo.reset()


# --------------------------------------------------------------------------- prefetch

def test_prefetcher_off_the_gpu_fetches_in_place():
    seq = iter(range(5))
    pos = {"n": 0}

    def fetch():
        pos["n"] += 1
        return {"x": torch.tensor([next(seq)])}

    p = Prefetcher(fetch, torch.device("cpu"), enabled=False, state=lambda: pos["n"])
    assert int(p.next()["x"]) == 0 and p.state() == 1 and int(p.next()["x"]) == 1 and p.state() == 2
    with pytest.raises(ValueError, match="CUDA"):
        Prefetcher(fetch, torch.device("cpu"), enabled=True)


def test_to_device_moves_the_views_and_leaves_the_rest_on_the_host(gen):
    """The step computes on the views; `keep` (range-checked by the model on the host, copied by it
    without blocking), `crops`, `index` and `label` stay where the loader put them."""
    batch = {**_batch(gen), "crops": torch.rand(12, 12), "index": torch.arange(2), "label": torch.arange(2),
             "name": "not a tensor"}
    out = to_device(batch, torch.device("meta"))
    assert {k for k, v in out.items() if torch.is_tensor(v) and v.is_meta} == {"image", "global_views", "local_views"}
    assert all(out[k] is batch[k] for k in HOST_KEYS) and out["name"] == "not a tensor"
    fed = Prefetcher(lambda: batch, torch.device("meta")).next()             # the trainer's feed
    assert fed["keep"] is batch["keep"] and fed["image"].is_meta


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefetcher_on_a_side_stream_keeps_the_loader_position():
    pos = {"n": 0}

    def fetch():
        pos["n"] += 1
        return {"x": torch.full((1024,), float(pos["n"]))}

    p = Prefetcher(fetch, torch.device("cuda"), enabled=True, state=lambda: pos["n"])
    for i in range(1, 4):
        batch = p.next()
        assert float(batch["x"].sum()) == 1024 * i and p.state() == i and pos["n"] == i + 1


# --------------------------------------------------------------------------- CUDA: no sync in the hot loop

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_steps_run_under_sync_debug_error_mode():
    """Three fast steps (packed encoder, fused CE, sync-free fused AdamW, device-side losses) on
    CUDA with torch.cuda.set_sync_debug_mode("error"): any host synchronisation raises."""
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    model = _model().to(device)
    opts = StepOptions.from_config({}, device)
    opt = build_optimizer(model, TRAIN, opts)
    batches = [to_device(_batch(gen), device) for _ in range(4)]      # as the trainer hands them over: keep on the host
    tracker = LossTracker(LOSS_NAMES, 3, device)
    out = forward_losses(model, batches[0], torch.bfloat16)      # warm-up (lazy inits may sync)
    update_without_sync(out["loss"], opt, 1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, batch in enumerate(batches[1:], 1):
            out = forward_losses(model, batch, torch.bfloat16)
            norm, _ = update_without_sync(out["loss"], opt, 1.0)
            tracker.add(step, out, norm)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rows = tracker.read()
    assert [s for s, _ in rows] == [1, 2, 3] and all(math.isfinite(v["loss"]) for _, v in rows)


# --------------------------------------------------------------------------- through the trainer

def _nan_at(step):
    def model_fn(model_cfg):
        model = build_model(dict(model_cfg))
        forward, calls = model.forward, [0]

        def poisoned(batch):
            calls[0] += 1
            out = forward(batch)
            if calls[0] == step:
                out["loss"] = out["loss"] * float("nan")
            return out

        model.forward = poisoned
        return model
    return model_fn


@pytest.mark.parametrize("sync_free, checkpoint_every", [(True, 8), (True, 2), (False, 2)])
def test_trainer_stops_at_the_read_after_a_non_finite_step(tmp_path, sync_free, checkpoint_every):
    """sync_free: step 3 is non-finite, its update is skipped on the device, the run goes on to
    the next read and stops there naming step 3, with rows 1-2 logged and no checkpoint past
    step 2. The next read is log.every's (5: step 5) when checkpoints are rarer (every 8), or the
    one before the checkpoint of step 4 when they come more often than reads (every 2). The
    reference path stops at once, before updating."""
    from stellar.train import NonFiniteLossError, load_config, pretrain, read_metrics
    from stellar.train.checkpoint import latest_checkpoint, list_checkpoints
    from test_train import TINY, seeded_loader
    cfg = load_config(None, [*TINY, "train.steps=10", f"train.checkpoint_every={checkpoint_every}", "log.every=5",
                             f"train.sync_free={str(sync_free).lower()}"])
    with pytest.raises(NonFiniteLossError) as err:
        pretrain(cfg, tmp_path / "run", loader_fn=seeded_loader, model_fn=_nan_at(3))
    message = str(err.value)
    assert "non-finite loss at step 3" in message and "loss=nan" in message
    rows = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.csv")]
    assert rows == [1, 2]
    saved = [p.name for p in list_checkpoints(tmp_path / "run")]
    if sync_free:
        stopped = 5 if checkpoint_every == 8 else 4
        assert "skipped on the device" in message and f"stopped at step {stopped}" in message
    else:
        assert "Stopped before updating" in message
    if checkpoint_every == 8:
        assert saved == [] and latest_checkpoint(tmp_path / "run") is None and "no checkpoint" in message
    else:
        assert saved == ["step_00000002"] and latest_checkpoint(tmp_path / "run").name == "step_00000002"
        assert "the last good checkpoint is" in message and "step_00000002" in message


# --------------------------------------------------------------------------- CUDA: the fast model against the reference

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fast_model_equals_the_reference_float32():
    """On the GPU: packed encoder + the prototype CE's Triton kernels against the public structure,
    float32 (no autocast), same weights and batch: losses and gradients."""
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(1)
    batch = {k: v.to(device) for k, v in _batch(gen, B=3, G=3).items()}
    grads = {}
    for name, over in (("ref", dict(pack_views=False, clustering={**TINY["clustering"], "fused": False})),
                       ("fast", dict(pack_views=True, clustering={**TINY["clustering"], "fused": True}))):
        model = _model(seed=3, **over).to(device)
        out = model(batch)
        out["loss"].backward()
        grads[name] = (out, {n: p.grad for n, p in model.named_parameters()})
    (ref, g_ref), (fast, g_fast) = grads["ref"], grads["fast"]
    for name in LOSS_NAMES:
        torch.testing.assert_close(fast["losses"][name], ref["losses"][name], rtol=1e-4, atol=1e-5)
    for name, g in g_ref.items():
        torch.testing.assert_close(g_fast[name], g, rtol=5e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["varlen", "xformers"])
def test_cuda_packed_attention_backends_match_sdpa(backend):
    """One varlen (or xformers block-diagonal) call over all sequences equals per-group SDPA, bf16."""
    from stellar.nn import Transformer
    from stellar.nn.vit import _varlen_fn, xformers_status
    if backend == "varlen" and _varlen_fn() is None:
        pytest.skip("torch.nn.attention.varlen is missing from this torch")
    if backend == "xformers" and not xformers_status()["loads"]:
        pytest.skip(xformers_status()["reason"])
    torch.manual_seed(0)
    tower = Transformer(128, 2, 2, 256).cuda()
    xs = [torch.randn(B, T, 128, device="cuda", requires_grad=True) for B, T in ((4, 213), (16, 56), (16, 53))]
    outs = {}
    for name in ("sdpa", backend):
        tower.attention = name
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = tower.forward_packed(xs)
        grads = torch.autograd.grad(sum(o.float().square().mean() for o in out), xs)
        outs[name] = ([o.float() for o in out], grads)
    for a, b in zip(outs[backend][0] + list(outs[backend][1]), outs["sdpa"][0] + list(outs["sdpa"][1])):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)


def test_trainer_with_compile_logs_the_eager_runs_losses(tmp_path):
    """train.compile (aot_eager) through pretrain: the same metrics rows as the eager run."""
    from stellar.train import load_config, pretrain, read_metrics
    from test_train import TINY, seeded_loader
    torch._dynamo.reset()
    rows = {}
    for name, extra in (("eager", []), ("compiled", ["train.compile=true", "train.compile_backend=aot_eager"])):
        cfg = load_config(None, [*TINY, "train.steps=2", "train.checkpoint_every=2", *extra])
        pretrain(cfg, tmp_path / name, loader_fn=seeded_loader)
        rows[name] = read_metrics(tmp_path / name / "metrics.csv")
    torch._dynamo.reset()
    assert [r["step"] for r in rows["compiled"]] == [1, 2]
    for a, b in zip(rows["compiled"], rows["eager"]):
        for key in ("loss", *LOSS_NAMES):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)

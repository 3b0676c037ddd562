"""The STELLAR model: config, ViT pieces, encoder/masking, decoder, heads and the training forward.
Tiny shapes only (CPU)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stellar.losses.clustering import soft_cross_entropy
from stellar.model import DEFAULT_CONFIG, LOSS_NAMES, build_model, resolve_config
from stellar.model.masking import sample_keep_indices
from stellar.nn import RandomFourierPositionEncoding, VisionTransformer

TINY = dict(arch="tiny", img_size=32, patch_size=8, dim=32, depth=1, heads=2, num_tokens=4,
            decoder=dict(dim=16, depth=1, heads=2, mlp_dim=32),
            clustering=dict(hidden=16, bottleneck=8, prototypes=12),
            masking=dict(mask_ratio=0.75))


def _batch(gen, B=2, G=2, Lc=2, S=32, s=16):
    return {"image": torch.rand(B, 3, S, S, generator=gen),
            "global_views": torch.rand(B, G, 3, S, S, generator=gen),
            "local_views": torch.rand(B, Lc, 3, s, s, generator=gen),
            "label": torch.zeros(B, dtype=torch.long)}


def _model(gen, **over):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    cfg = {**TINY, **over}
    return build_model(cfg)


# ---------------------------------------------------------------- config
def test_config_defaults_and_presets():
    cfg = resolve_config({})
    assert (cfg["dim"], cfg["depth"], cfg["heads"], cfg["patch_size"], cfg["img_size"]) == (768, 12, 12, 16, 224)
    assert cfg["loss"]["w_rec"] == 10.0 and cfg["num_tokens"] == 16 and cfg["clustering"]["prototypes"] == 16384
    huge = resolve_config({"arch": "huge"})
    assert (huge["dim"], huge["depth"], huge["heads"], huge["patch_size"]) == (1280, 32, 16, 14)
    assert resolve_config({"arch": "large", "patch_size": 14})["patch_size"] == 14
    assert resolve_config({"decoder": {"head": "tokens"}})["loss"]["w_rec"] == 0.05
    assert resolve_config({"masking": {"focal": "none"}})["masking"]["focal"] is None
    assert set(DEFAULT_CONFIG) >= {"arch", "decoder", "clustering", "masking", "loss", "ema"}


@pytest.mark.parametrize("cfg, name", [({"bogus": 1}, "bogus"), ({"decoder": {"widht": 3}}, "decoder.widht"),
                                       ({"arch": "giant"}, "arch"), ({"decoder": {"head": "rgb"}}, "head")])
def test_config_errors_name_the_key(cfg, name):
    with pytest.raises(ValueError, match=name):
        resolve_config(cfg)


# ---------------------------------------------------------------- ViT pieces
def _vit_twin(vit, x):
    """Float64 ViT forward written out head by head (separate q/k/v slices of the fused weight)."""
    B, T, D = x.shape
    for blk in vit.blocks:
        h = F.layer_norm(x, (D,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        Wq, Wk, Wv = blk.attn.qkv.weight.split(D)
        bq, bk, bv = blk.attn.qkv.bias.split(D)
        heads, hd = blk.attn.heads, D // blk.attn.heads
        out = torch.empty_like(h)
        for b in range(B):
            q, k, v = h[b] @ Wq.T + bq, h[b] @ Wk.T + bk, h[b] @ Wv.T + bv
            for i in range(heads):
                sl = slice(i * hd, (i + 1) * hd)
                a = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(hd), dim=-1)
                out[b, :, sl] = a @ v[:, sl]
        x = x + out @ blk.attn.proj.weight.T + blk.attn.proj.bias
        h = F.layer_norm(x, (D,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
        u = h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
        x = x + 0.5 * u * (1 + torch.erf(u / math.sqrt(2))) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    return F.layer_norm(x, (D,), vit.norm.weight, vit.norm.bias, vit.norm.eps)


@pytest.mark.parametrize("size", [(32, 32), (16, 40)])
def test_vit_matches_float64_twin(gen, size):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, dim=24, depth=2, heads=3, ln_eps=1e-6).double()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x = torch.randn(2, 3, *size, generator=gen, dtype=torch.float64)
    tokens = vit.embed(x)
    h, w = size[0] // 8, size[1] // 8
    assert tokens.shape == (2, 1 + h * w, 24)
    patches = F.conv2d(x, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=8).flatten(2).transpose(1, 2)
    pos = vit.pos_embed
    if (h, w) != (4, 4):
        grid = F.interpolate(pos[:, 1:].reshape(1, 4, 4, 24).permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                             align_corners=False)
        pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], 1)
    want_tokens = torch.cat([vit.cls_token.expand(2, -1, -1), patches], 1) + pos
    torch.testing.assert_close(tokens, want_tokens, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vit(x), _vit_twin(vit, want_tokens), rtol=1e-10, atol=1e-10)
    vit.double().zero_grad()
    (vit(x) * torch.randn(vit(x).shape, generator=gen, dtype=torch.float64)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vit.parameters())


def test_vit_rejects_bad_images():
    vit = VisionTransformer(img_size=32, patch_size=8, dim=16, depth=1, heads=2)
    with pytest.raises(ValueError, match="patch size"):
        vit(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match="images"):
        vit(torch.rand(1, 1, 32, 32))


def test_fourier_position_encoding_formula(gen):
    pe = RandomFourierPositionEncoding(12, generator=gen).double()
    Gm = pe.positional_encoding_gaussian_matrix
    assert Gm.shape == (2, 6)
    h, w = 3, 5
    out = pe(h, w)
    assert out.shape == (h * w, 12)
    for i in range(h):
        for j in range(w):
            x, y = 2 * (j + 0.5) / w - 1, 2 * (i + 0.5) / h - 1
            for k in range(6):
                f = 2 * math.pi * (x * Gm[0, k] + y * Gm[1, k])
                row = i * w + j
                assert abs(out[row, 2 * k] - math.sin(f)) < 1e-12
                assert abs(out[row, 2 * k + 1] - math.cos(f)) < 1e-12


# ---------------------------------------------------------------- encoder, decoder
def test_encode_shapes_and_decode(gen):
    model = _model(gen).eval()
    images = torch.rand(2, 3, 32, 40, generator=gen)
    out = model.encode(images)
    N, r, D = 4 * 5, 4, 32
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "cls": (2, 1, D), "dense": (2, N, D), "sparse": (2, r, D), "L": (2, N, r), "Z": (2, N, D)}
    torch.testing.assert_close(out["L"].sum(-1), torch.ones(2, N))
    torch.testing.assert_close(out["Z"], out["L"] @ out["sparse"])
    assert model.decode(out["Z"], grid=(4, 5)).shape == (2, 3, 32, 40)
    sq = model.encode(images[..., :32])
    assert model.decode(sq["Z"]).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="grid"):
        model.decode(out["Z"])                                   # 20 patches: not square


def test_low_rank_decoder_input_equals_projected_Z(gen):
    model = _model(gen).double()
    images = torch.rand(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    _, dense, sparse = model.encoder(images)
    low, L = model.factorization(dense, sparse, out_proj=model.decoder.proj)
    Z, L2 = model.factorization(dense, sparse)
    torch.testing.assert_close(L, L2)
    torch.testing.assert_close(low, model.decoder.proj(Z), rtol=1e-6, atol=1e-6)


def test_masked_view_keeps_exactly_the_kept_tokens(gen):
    model = _model(gen).double()
    images = torch.rand(3, 3, 32, 32, generator=gen, dtype=torch.float64)
    keep = sample_keep_indices(3, 4, 4, mask_ratio=0.75, focal="gaussian", generator=gen)
    assert keep.shape == (3, 4)
    full = model.encoder.tokens(images)
    seq = model.encoder.tokens(images, keep)
    want = torch.cat([full[:, :1], torch.stack([full[b, 1 + keep[b]] for b in range(3)]), full[:, -4:]], 1)
    torch.testing.assert_close(seq, want, rtol=0, atol=0)
    cls, dense, sparse = model.encoder(images, keep=keep)
    out = model.encoder.vit.transformer(want)
    torch.testing.assert_close(torch.cat([cls, dense, sparse], 1), out)
    assert dense.shape == (3, 4, 32) and sparse.shape == (3, 4, 32)
    with pytest.raises(ValueError, match="keep"):
        model.encoder(images, keep=keep[:2])
    with pytest.raises(ValueError, match="keep"):
        model.encoder(images, keep=keep + 16)


@pytest.mark.parametrize("packed", [False, True])
def test_forward_sequences_per_view_group(gen, packed):
    """forward(batch) runs the full image (1+N+r tokens), B*G masked views (1+n_keep+r) and
    B*Lc local views (1+n_local+r) through the encoder blocks: one call per group, or one packed
    pass over all their tokens (pack_views)."""
    model = _model(gen, pack_views=packed)
    tower = model.encoder.vit.transformer
    seen, packed_calls = [], []
    hook = tower.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    block_hook = tower.blocks[0].register_forward_pre_hook(lambda m, a: packed_calls.append(tuple(a[0].shape)))
    model(_batch(gen, B=2, G=3, Lc=2))
    hook.remove()
    block_hook.remove()
    groups = [(2, 1 + 16 + 4, 32), (6, 1 + 4 + 4, 32), (4, 1 + 4 + 4, 32)]
    if packed:
        assert seen == [] and packed_calls == [(sum(b * t for b, t, _ in groups), 32)]
    else:
        assert seen == groups and packed_calls == groups


# ---------------------------------------------------------------- training forward
def test_every_parameter_gets_a_gradient(gen):
    model = _model(gen)
    out = model(_batch(gen, G=2, Lc=2))
    assert set(out["losses"]) == set(LOSS_NAMES)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    lacking = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert not lacking, lacking


def _ref_sinkhorn(logits, T=0.06, iterations=3, eps=1e-8):
    """The public formula in NumPy float64: per-column max shift + 50, then the normalisations."""
    S = logits.detach().double().numpy() / T
    Q = np.exp(S - S.max(axis=0, keepdims=True) + 50.0)
    for _ in range(iterations):
        Q = Q / (Q.sum(axis=0, keepdims=True) + eps)
        Q = Q / (Q.sum(axis=1, keepdims=True) + eps)
    return torch.from_numpy(Q)


def _ref_ce(logits, targets, T=0.12):
    return -(targets * torch.log_softmax(logits.double() / T, -1)).sum(-1).mean()


def _ref_match(pred, target, eps=0.1, iterations=5):
    """Entropic OT in the scaling domain (u = a / K v, v = b / K^T u), argmax of each row."""
    C = ((pred[:, :, None] - target[:, None]) ** 2).sum(-1).sqrt()          # B x r x r
    K = torch.exp(-C / eps)
    r = C.shape[1]
    v = torch.ones(C.shape[0], r, dtype=C.dtype)
    for _ in range(iterations):
        u = (1 / r) / (K @ v[..., None])[..., 0]
        v = (1 / r) / (K.transpose(1, 2) @ u[..., None])[..., 0]
    return (u[..., None] * K * v[:, None]).argmax(-1)


def _ref_koleo(x):
    n = x / x.norm(dim=-1, keepdim=True)
    dots = n @ n.transpose(1, 2) - 3 * torch.eye(x.shape[1], dtype=x.dtype)  # self excluded
    nb = torch.gather(n, 1, dots.argmax(-1, keepdim=True).expand_as(n))
    return -torch.log(0.5 * (n - nb).norm(dim=-1) + 1e-8).mean()


def _ref_objective(model, batch, w_rec, w_koleo):
    """The whole objective of STELLAR.md sections 3-6 written out in float64 from the model's
    modules (encoder, heads, decoder) and the plain factorization formula, with loss formulas of
    this file's own: no call into stellar.losses."""
    from stellar.kernels.reference import factorize

    image, views, local, keep = batch["image"], batch["global_views"], batch["local_views"], batch["keep"]
    B, G = views.shape[:2]
    cls, dense, sparse = model.encoder(image)
    fz = model.factorization
    Z, _ = factorize(fz.dense_proj(dense), fz.sparse_proj(sparse), sparse, fz.temperature, 1e-7)
    recon = ((model.decoder(model.decoder.proj(Z), model.encoder.grid(image)) - image) ** 2).mean()
    logits = model.clustering_head(sparse)                                   # B x r x C
    r, C = logits.shape[1:]
    targets = _ref_sinkhorn(logits.flatten(0, 1)).view(B, r, C)
    cls_logits = model.cls_head(cls[:, 0])
    cls_t = _ref_sinkhorn(cls_logits)
    clustering = _ref_ce(logits.flatten(0, 1), targets.flatten(0, 1))
    cls_clustering = _ref_ce(cls_logits, cls_t)
    mask_terms, cls_terms, koleo_m = [], [], []
    for g in range(G):                                                       # view by view
        cls_m, _, sparse_m = model.encoder(views[:, g], keep=keep[:, g])
        match = _ref_match(sparse_m.detach(), sparse.detach())
        t = torch.stack([targets[b, match[b]] for b in range(B)])
        mask_terms.append(_ref_ce(model.clustering_head(sparse_m).flatten(0, 1), t.flatten(0, 1)))
        cls_terms.append(_ref_ce(model.cls_head(cls_m[:, 0]), cls_t))
        koleo_m.append(_ref_koleo(sparse_m))
    mask_loss = torch.stack(mask_terms).mean()                               # equal counts: mean of means
    cls_loss = torch.stack(cls_terms).mean()
    cls_l = model.encoder(local.flatten(0, 1))[0][:, 0]
    cls_loss = cls_loss + _ref_ce(model.cls_head(cls_l), cls_t.repeat_interleave(local.shape[1], 0))
    koleo = _ref_koleo(sparse) + torch.stack(koleo_m).mean()
    parts = dict(recon=recon, clustering_loss=clustering, cls_clustering_loss=cls_clustering,
                 mask_loss=mask_loss, cls_loss=cls_loss, koleo=koleo)
    total = w_rec * recon + clustering + cls_clustering + mask_loss + cls_loss + w_koleo * koleo
    return total, parts


def test_objective_matches_an_independent_float64_writing(gen):
    """Every term and the total against _ref_objective (same weights, same views, same kept
    patches given with the batch), and the gradients of the total w.r.t. the sparse tokens."""
    # 512 prototypes: enough that some columns' best score lies > ln(1e8) below the global best
    # (at 12 the Sinkhorn shift would not matter and a wrong one would pass).
    model = _model(gen, loss=dict(w_rec=3.0, w_koleo=0.5),
                   clustering=dict(hidden=16, bottleneck=8, prototypes=512)).double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in _batch(gen, G=2, Lc=2).items()}
    batch["keep"] = torch.stack([sample_keep_indices(2, 4, 4, 0.75, "gaussian", generator=gen)
                                 for _ in range(2)], dim=1)                  # B x G x 4
    out = model(batch)
    want_total, want = _ref_objective(model, batch, 3.0, 0.5)
    for name in LOSS_NAMES:
        torch.testing.assert_close(out["losses"][name], want[name].detach(), rtol=1e-9, atol=1e-10, msg=name)
    torch.testing.assert_close(out["loss"], want_total, rtol=1e-9, atol=1e-10)
    (g,) = torch.autograd.grad(out["loss"], model.encoder.sparse_tokens)
    (g_ref,) = torch.autograd.grad(want_total, model.encoder.sparse_tokens)
    torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-9)


def test_kept_patches_come_with_the_batch(gen):
    """batch['keep'] fixes the masked views: the same keep gives the same loss whatever the global
    RNG, another keep another loss; bad keeps are refused naming the key."""
    model = _model(gen)
    batch = _batch(gen, G=2, Lc=0)
    keep = torch.stack([sample_keep_indices(2, 4, 4, 0.75, generator=gen) for _ in range(2)], dim=1)
    torch.manual_seed(1)
    a = model({**batch, "keep": keep})["losses"]["mask_loss"]
    torch.manual_seed(2)
    b = model({**batch, "keep": keep})["losses"]["mask_loss"]
    c = model({**batch, "keep": (keep + 5) % 16})["losses"]["mask_loss"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    for bad in (keep[:, :1], keep[..., :3], keep.int(), keep + 16, keep - 20):
        with pytest.raises(ValueError, match="keep"):
            model({**batch, "keep": bad})


def test_views_optional(gen):
    model = _model(gen)
    b = _batch(gen, G=0, Lc=0)
    out = model(b)
    assert float(out["losses"]["mask_loss"]) == 0 and float(out["losses"]["cls_loss"]) == 0
    out = model({"image": b["image"], "local_views": torch.rand(2, 1, 3, 16, 16, generator=gen)})
    assert float(out["losses"]["mask_loss"]) == 0 and float(out["losses"]["cls_loss"]) > 0


def test_forward_rejects_bad_batches(gen):
    model = _model(gen)
    b = _batch(gen)
    with pytest.raises(ValueError, match="image"):
        model({"global_views": b["global_views"]})
    with pytest.raises(ValueError, match="global_views"):
        model({**b, "global_views": b["global_views"][:1]})
    with pytest.raises(ValueError, match="local_views"):
        model({**b, "local_views": b["local_views"][:, 0]})


def test_token_head_with_tokenizer(gen):
    from stellar.model.tokenizer import VQGANTokenizer
    torch.manual_seed(1)
    tok = VQGANTokenizer(hidden_channels=32, channel_mult=(1, 1), num_res_blocks=1, z_channels=8,
                         codebook_size=10)                     # f = 2: a 4x4 grid needs 8x8 px
    model = _model(gen, decoder=dict(dim=16, depth=1, heads=2, mlp_dim=32, head="tokens", vocab=10))
    with pytest.raises(RuntimeError, match="tokenizer"):
        model(_batch(gen, G=0, Lc=0))
    model.set_tokenizer(tok)
    b = _batch(gen, G=1, Lc=0)
    out = model(b)
    with torch.no_grad():
        logits = model.decode(model.encode(b["image"])["Z"])
        codes = tok(F.interpolate(b["image"], size=(8, 8), mode="bicubic", align_corners=False))
    assert logits.shape == (2, 16, 10) and codes.shape == (2, 4, 4)
    torch.testing.assert_close(out["losses"]["recon"], F.cross_entropy(logits.flatten(0, 1), codes.flatten()),
                               rtol=1e-5, atol=1e-6)
    out["loss"].backward()
    assert model.decoder.head.weight.grad is not None
    assert all(p.grad is None for p in tok.parameters())


def test_ema_teacher(gen):
    model = _model(gen, ema=dict(enabled=True, momentum=0.9))
    assert all(not p.requires_grad for p in model.teacher.parameters())
    before = [p.clone() for p in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.5)
    student = list(model.encoder.parameters())
    out = model(_batch(gen, G=2, Lc=1))                        # train mode: the forward leaves the teacher
    assert all(torch.equal(a, b) for a, b in zip(before, model.teacher.parameters()))
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.encoder.sparse_tokens.grad is not None
    model.update_teacher()                                     # the trainer's call after the optimizer step
    teacher = list(model.teacher["encoder"].parameters())
    for t, b, s in zip(teacher, before, student):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s.detach())
    # (the order within the training loop: tests/test_train.py::test_the_ema_teacher_...)


def test_cls_loss_from_masked_and_local_views(gen):
    """cls_loss = CE of the masked views' CLS + CE of the local views' CLS vs the full image's targets."""
    model = _model(gen, masking=dict(mask_ratio=0.0, focal="none"))   # keep all: deterministic views
    b = _batch(gen, G=2, Lc=1)
    out = model(b)
    with torch.no_grad():
        from stellar.losses.clustering import sinkhorn_knopp
        cls = model.encoder(b["image"])[0][:, 0]
        t = sinkhorn_knopp(model.cls_head(cls), 0.06, 3)
        cls_m = model.encoder(b["global_views"].flatten(0, 1))[0][:, 0]
        cls_l = model.encoder(b["local_views"].flatten(0, 1))[0][:, 0]
        want = soft_cross_entropy(model.cls_head(cls_m), t.repeat_interleave(2, 0), 0.12) \
            + soft_cross_entropy(model.cls_head(cls_l), t, 0.12)
    torch.testing.assert_close(out["losses"]["cls_loss"], want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the fast path (issue 8) against the reference
REFERENCE = dict(pack_views=False, clustering=dict(fused=False))


def _awkward(gen, dtype=torch.float64, **over):
    """A model with awkward sizes (D 36 over 3 heads, r 7, 50 prototypes) and its batch, in dtype."""
    cfg = dict(dim=36, heads=3, num_tokens=7, clustering=dict(hidden=24, bottleneck=10, prototypes=50))
    cfg.update(over)
    model = _model(gen, **cfg).to(dtype)
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _batch(gen, B=3, G=3, Lc=2, s=24).items()}
    batch["keep"] = torch.stack([sample_keep_indices(3, 4, 4, 0.75, "gaussian", generator=gen)
                                 for _ in range(3)], dim=1)                  # B x G x 4
    return model, batch


def _losses_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _set_variant(model, **cfg):
    """Switch a built model between the reference and the fast structure (same weights)."""
    from stellar.model.stellar import _prototype_ce_fn
    for key in ("pack_views",):
        if key in cfg:
            model.cfg[key] = cfg[key]
    if "fused" in cfg:
        model.cfg["clustering"]["fused"] = cfg["fused"]
        model._prototype_ce = cfg.get("fn") or _prototype_ce_fn(cfg["fused"])
    return model


@pytest.mark.parametrize("variant", ["packed+op", "packed+indexed", "unpacked+op", "packed+reference-ce"])
@pytest.mark.parametrize("ema", [False, True])
def test_fast_path_equals_reference_float64(gen, variant, ema):
    """Packed encoder and the prototype-CE wiring (the op, or the indexed twin) give the public
    structure's losses and every parameter's gradient, in float64, from the same weights and views."""
    from stellar.model.heads import indexed_prototype_cross_entropy
    model, batch = _awkward(gen, ema=dict(enabled=ema, momentum=0.9), **REFERENCE)
    ref, ref_grads = _losses_and_grads(model, batch)
    packed, ce = variant.split("+")
    fused = {"op": True, "indexed": True, "reference-ce": False}[ce]
    _set_variant(model, pack_views=packed == "packed", fused=fused,
                 fn=indexed_prototype_cross_entropy if ce == "indexed" else None)
    fast, fast_grads = _losses_and_grads(model, batch)
    for name in LOSS_NAMES:
        torch.testing.assert_close(fast["losses"][name], ref["losses"][name], rtol=1e-10, atol=1e-12, msg=name)
    assert float(ref["losses"]["mask_loss"]) > 0 and float(ref["losses"]["cls_loss"]) > 0
    assert set(fast_grads) == set(ref_grads) and len(ref_grads) > 20
    for name, g in ref_grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(fast_grads[name], g, rtol=1e-8, atol=1e-11, msg=name)


def test_fast_path_equals_reference_float32(gen):
    model, batch = _awkward(gen, torch.float32, **REFERENCE)
    ref, ref_grads = _losses_and_grads(model, batch)
    _set_variant(model, pack_views=True, fused=True)
    fast, fast_grads = _losses_and_grads(model, batch)
    for name in LOSS_NAMES:
        torch.testing.assert_close(fast["losses"][name], ref["losses"][name], rtol=2e-5, atol=1e-6, msg=name)
    for name, g in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], g, rtol=1e-3, atol=1e-5, msg=name)


def test_the_default_config_is_the_fast_path():
    cfg = resolve_config({})
    assert cfg["pack_views"] is True and cfg["attention"] == "auto" and cfg["clustering"]["fused"] == "auto"
    assert cfg["residual_bf16"] is False
    for bad, key in (({"attention": "flash"}, "attention"), ({"clustering": {"fused": "yes"}}, "fused"),
                     ({"pack_views": "no"}, "pack_views")):
        with pytest.raises(ValueError, match=key):
            resolve_config(bad)


@pytest.mark.parametrize("shapes", [[(2, 21), (6, 9), (4, 9)], [(1, 5)], [(1, 7), (3, 2)]])
def test_packed_transformer_equals_per_group_float64(gen, shapes):
    from stellar.nn import Transformer
    torch.manual_seed(0)
    tower = Transformer(30, 2, 3, 40).double()
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    xs = [torch.randn(B, T, 30, generator=gen, dtype=torch.float64, requires_grad=True) for B, T in shapes]
    want = [tower(x) for x in xs]
    got = tower.forward_packed(xs)
    up = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    g_want = torch.autograd.grad(sum((w * u).sum() for w, u in zip(want, up)), xs + [tower.blocks[0].attn.qkv.weight])
    g_got = torch.autograd.grad(sum((g * u).sum() for g, u in zip(got, up)), xs + [tower.blocks[0].attn.qkv.weight])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    with pytest.raises(ValueError, match=r"xs\[0\]"):
        tower.forward_packed([torch.randn(2, 3, 31)])


@pytest.mark.parametrize("backend", ["varlen", "xformers"])
def test_packed_attention_backend_falls_back_with_a_warning_on_cpu(gen, backend):
    from stellar.nn import Transformer
    import stellar.nn.vit as vit
    tower = Transformer(16, 1, 2, 32)
    tower.attention = backend
    xs = [torch.randn(2, 5, 16, generator=gen), torch.randn(3, 4, 16, generator=gen)]
    vit._fallback_warned.clear()
    with pytest.warns(UserWarning, match=backend):
        got = tower.forward_packed(xs)
    for g, x in zip(got, xs):
        torch.testing.assert_close(g, tower(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="attention"):
        tower.attention = "flash"


def test_xformers_status_says_why():
    from stellar.nn.vit import xformers_status
    st = xformers_status()
    assert set(st) == {"loads", "version", "reason"} and isinstance(st["loads"], bool) and st["reason"]


@pytest.mark.parametrize("index", [None, "views"])
def test_indexed_prototype_ce_equals_gathered_soft_ce_float64(gen, index):
    from stellar.model.heads import indexed_prototype_cross_entropy
    M, K, C, T = 13, 7, 100, 5
    z = F.normalize(torch.randn(M, K, generator=gen, dtype=torch.float64), dim=-1).requires_grad_()
    W = torch.randn(C, K, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.softmax(torch.randn(M if index is None else T, C, generator=gen, dtype=torch.float64) * 3, -1)
    t = t * (1 + 0.1 * torch.rand(t.shape[0], 1, generator=gen, dtype=torch.float64))   # rows not summing to 1
    idx = None if index is None else torch.randint(0, T, (M,), generator=gen)
    got = indexed_prototype_cross_entropy(z, W, t, 0.12, idx)
    want = soft_cross_entropy(z @ W.T, t if idx is None else t[idx], 0.12)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (z, W)), torch.autograd.grad(want, (z, W))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bf16_views_equal_their_float32_rounding(gen):
    """bf16 views from a loader: the same losses as float32 views holding the same rounded pixels."""
    model, batch = _awkward(gen, torch.float32)
    rounded = {k: v.bfloat16().float() if v.is_floating_point() else v for k, v in batch.items()}
    half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in batch.items()}
    a, b = model(rounded), model(half)
    for name in LOSS_NAMES:
        torch.testing.assert_close(b["losses"][name], a["losses"][name], rtol=1e-6, atol=1e-7, msg=name)


def test_residual_bf16_keeps_the_stream_16_bit_under_autocast(gen):
    model, batch = _awkward(gen, torch.float32, residual_bf16=True)
    seen = []
    hook = model.encoder.vit.transformer.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    dec_hook = model.decoder.transformer.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(batch)
    model.encoder.vit.transformer.residual_bf16 = model.decoder.transformer.residual_bf16 = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(batch)
    hook.remove()
    dec_hook.remove()
    # encoder with the flag, decoder with the flag, encoder without it (promoted by the float32
    # position table); the decoder's stream is bf16 either way (its Fourier PE is a matmul).
    assert seen[:3] == [torch.bfloat16, torch.bfloat16, torch.float32]
    full = model(batch)                                        # no autocast: the flag does nothing
    for name in LOSS_NAMES:
        torch.testing.assert_close(low["losses"][name], full["losses"][name], rtol=5e-2, atol=5e-2, msg=name)
        torch.testing.assert_close(mixed["losses"][name], full["losses"][name], rtol=5e-2, atol=5e-2, msg=name)


def test_fused_auto_uses_the_op_on_cuda_only(gen):
    """clustering.fused: auto goes through the op for CUDA tensors while the pieces run eager,
    keeps the public structure on the CPU and once compiled; true takes the op everywhere; false never."""
    calls = []
    model = _model(gen)
    op = model._prototype_ce
    model._prototype_ce = lambda *a, **k: calls.append(1) or op(*a, **k)
    b = _batch(gen, G=1, Lc=1)
    model(b)
    assert calls == []                                           # auto, CPU: public structure
    model.cfg["clustering"]["fused"] = True
    model(b)
    assert len(calls) == 5               # clustering, cls_clustering, mask_loss, cls_loss (masked), cls_loss (local)
    from types import SimpleNamespace
    model.cfg["clustering"]["fused"] = "auto"
    assert model._fused_ce(SimpleNamespace(is_cuda=True)) and not model._fused_ce(torch.zeros(1))
    model.compile_pieces(backend="eager")                        # compiled: inductor fuses the plain loss faster
    assert not model._fused_ce(SimpleNamespace(is_cuda=True))
    model.cfg["clustering"]["fused"] = True
    assert model._fused_ce(SimpleNamespace(is_cuda=True))
    model._prototype_ce = None                                   # fused: false
    assert not model._fused_ce(SimpleNamespace(is_cuda=True))

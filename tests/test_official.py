"""load_official: a fake checkpoint in the public (Hugging Face ViTModel) layout with random
weights, compared against an independent float64 forward written in HF's formulation
(separate q/k/v, HF layer names, explicit softmax attention, public PE and decoder)."""
import math

import pytest
import torch
import torch.nn.functional as F

from stellar.model import load_official
from stellar.model.official import infer_config

D, DEPTH, HEADS, MLP, PATCH, SIDE, R = 32, 2, 4, 64, 8, 4, 5        # 32 px images, 4x4 patches
DD, DDEPTH, DHEADS, DMLP = 24, 2, 2, 40                             # decoder
HIDDEN, BOTTLENECK, PROTOS = 20, 12, 9
EPS = 1e-12
TAU = 0.06
MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)


def _hf_layers(sd, prefix, width, depth, mlp, g):
    for i in range(depth):
        p = f"{prefix}.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            sd[p + f"attention.attention.{name}.weight"] = torch.randn(width, width, generator=g) * width ** -0.5
            sd[p + f"attention.attention.{name}.bias"] = torch.randn(width, generator=g) * 0.1
        sd[p + "attention.output.dense.weight"] = torch.randn(width, width, generator=g) * width ** -0.5
        sd[p + "attention.output.dense.bias"] = torch.randn(width, generator=g) * 0.1
        for ln in ("layernorm_before", "layernorm_after"):
            sd[p + f"{ln}.weight"] = 1 + 0.1 * torch.randn(width, generator=g)
            sd[p + f"{ln}.bias"] = 0.1 * torch.randn(width, generator=g)
        sd[p + "intermediate.dense.weight"] = torch.randn(mlp, width, generator=g) * width ** -0.5
        sd[p + "intermediate.dense.bias"] = torch.randn(mlp, generator=g) * 0.1
        sd[p + "output.dense.weight"] = torch.randn(width, mlp, generator=g) * mlp ** -0.5
        sd[p + "output.dense.bias"] = torch.randn(width, generator=g) * 0.1
    sd[f"{prefix}.layernorm.weight"] = 1 + 0.1 * torch.randn(width, generator=g)
    sd[f"{prefix}.layernorm.bias"] = 0.1 * torch.randn(width, generator=g)
    sd[f"{prefix}.pooler.dense.weight"] = torch.randn(width, width, generator=g)   # unused by STELLAR
    sd[f"{prefix}.pooler.dense.bias"] = torch.randn(width, generator=g)


def fake_public_state_dict(g, head="pixels", vocab=11):
    sd = {}
    sd["encoder.embeddings.cls_token"] = torch.randn(1, 1, D, generator=g)
    sd["encoder.embeddings.position_embeddings"] = torch.randn(1, 1 + SIDE * SIDE, D, generator=g)
    sd["encoder.embeddings.patch_embeddings.projection.weight"] = torch.randn(D, 3, PATCH, PATCH, generator=g) * 0.1
    sd["encoder.embeddings.patch_embeddings.projection.bias"] = torch.randn(D, generator=g) * 0.1
    _hf_layers(sd, "encoder", D, DEPTH, MLP, g)
    # The decoder is a whole HF ViTModel in the public code: its embeddings exist but are unused.
    sd["decoder.embeddings.cls_token"] = torch.randn(1, 1, DD, generator=g)
    sd["decoder.embeddings.position_embeddings"] = torch.randn(1, 197, DD, generator=g)
    sd["decoder.embeddings.patch_embeddings.projection.weight"] = torch.randn(DD, 3, 16, 16, generator=g)
    sd["decoder.embeddings.patch_embeddings.projection.bias"] = torch.randn(DD, generator=g)
    _hf_layers(sd, "decoder", DD, DDEPTH, DMLP, g)
    sd["sparse_tokens"] = torch.randn(R, D, generator=g) * D ** -0.5
    for name in ("dense_proj", "sparse_proj"):
        sd[f"{name}.weight"] = torch.randn(D, D, generator=g) * D ** -0.5
        sd[f"{name}.bias"] = torch.randn(D, generator=g) * 0.1
    sd["decoder_proj.weight"] = torch.randn(DD, D, generator=g) * D ** -0.5
    sd["decoder_proj.bias"] = torch.randn(DD, generator=g) * 0.1
    sd["position_embedding.positional_encoding_gaussian_matrix"] = torch.randn(2, DD // 2, generator=g)
    if head == "pixels":
        sd["reconstruction_head.weight"] = torch.randn(DD, 3, PATCH, PATCH, generator=g) * 0.1
        sd["reconstruction_head.bias"] = torch.randn(3, generator=g) * 0.1
    else:
        sd["reconstruction_head.weight"] = torch.randn(vocab, DD, generator=g) * 0.1
        sd["reconstruction_head.bias"] = torch.randn(vocab, generator=g) * 0.1
    for h in ("clustering_head", "cls_cluster_head"):
        sd[f"{h}.predictor.layers.0.weight"] = torch.randn(HIDDEN, D, generator=g) * 0.1
        sd[f"{h}.predictor.layers.0.bias"] = torch.randn(HIDDEN, generator=g) * 0.1
        sd[f"{h}.predictor.layers.2.weight"] = torch.randn(BOTTLENECK, HIDDEN, generator=g) * 0.1
        sd[f"{h}.predictor.layers.2.bias"] = torch.randn(BOTTLENECK, generator=g) * 0.1
        sd[f"{h}.layer.weight"] = torch.randn(PROTOS, BOTTLENECK, generator=g)
    return sd


# ---------------------------------------------------------------- the float64 HF-style reference
def _ln(x, sd, key):
    return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps=EPS)


def _lin(x, sd, key):
    return x @ sd[key + ".weight"].T + sd[key + ".bias"]


def _hf_encoder(x, sd, prefix, depth, heads):
    B, T, W = x.shape
    hd = W // heads
    for i in range(depth):
        p = f"{prefix}.encoder.layer.{i}."
        h = _ln(x, sd, p + "layernorm_before")
        q, k, v = (_lin(h, sd, p + f"attention.attention.{n}").view(B, T, heads, hd).permute(0, 2, 1, 3)
                   for n in ("query", "key", "value"))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        ctx = (probs @ v).permute(0, 2, 1, 3).reshape(B, T, W)
        x = _lin(ctx, sd, p + "attention.output.dense") + x
        h = _ln(x, sd, p + "layernorm_after")
        x = _lin(F.gelu(_lin(h, sd, p + "intermediate.dense")), sd, p + "output.dense") + x
    return _ln(x, sd, f"{prefix}.layernorm")


def reference_encode(sd, images):
    sd = {k: v.double() for k, v in sd.items()}
    x = (images.double() - MEAN) / STD
    B, _, H, W = x.shape
    patches = F.conv2d(x, sd["encoder.embeddings.patch_embeddings.projection.weight"],
                       sd["encoder.embeddings.patch_embeddings.projection.bias"], stride=PATCH)
    h, w = patches.shape[-2:]
    emb = torch.cat([sd["encoder.embeddings.cls_token"].expand(B, -1, -1), patches.flatten(2).transpose(1, 2)], 1)
    pos = sd["encoder.embeddings.position_embeddings"]
    if (h, w) != (SIDE, SIDE):    # HF interpolate_pos_encoding: bicubic to the new grid
        grid = pos[:, 1:].reshape(1, SIDE, SIDE, D).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, D)], 1)
    emb = emb + pos
    seq = torch.cat([emb, sd["sparse_tokens"].expand(B, -1, -1)], 1)
    out = _hf_encoder(seq, sd, "encoder", DEPTH, HEADS)
    n = emb.shape[1]
    cls, dense, sparse = out[:, :1], out[:, 1:n], out[:, n:]
    q = F.normalize(_lin(dense, sd, "dense_proj"), dim=-1, eps=1e-7)
    k = F.normalize(_lin(sparse, sd, "sparse_proj"), dim=-1, eps=1e-7)
    L = torch.softmax(q @ k.transpose(1, 2) / TAU, dim=-1)
    return {"cls": cls, "dense": dense, "sparse": sparse, "L": L, "Z": L @ sparse}


def reference_decode(sd, Z, h, w):
    sd = {k: v.double() for k, v in sd.items()}
    x = _lin(Z.double(), sd, "decoder_proj")
    G = sd["position_embedding.positional_encoding_gaussian_matrix"]
    pe = torch.empty(h, w, DD, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            c = torch.tensor([(j + 0.5) / w, (i + 0.5) / h], dtype=torch.float64) * 2 - 1
            f = 2 * math.pi * (c @ G)
            pe[i, j, 0::2], pe[i, j, 1::2] = f.sin(), f.cos()
    x = _hf_encoder(x + pe.reshape(1, h * w, DD), sd, "decoder", DDEPTH, DHEADS)
    if sd["reconstruction_head.weight"].dim() == 2:
        return _lin(x, sd, "reconstruction_head")
    B = x.shape[0]
    return F.conv_transpose2d(x.transpose(1, 2).reshape(B, DD, h, w), sd["reconstruction_head.weight"],
                              sd["reconstruction_head.bias"], stride=PATCH)


def _load(sd, **kw):
    return load_official(sd, num_heads=HEADS, decoder={"heads": DHEADS}, **kw)


# ---------------------------------------------------------------- tests
def test_infers_shapes(gen):
    cfg = infer_config(fake_public_state_dict(gen), num_heads=HEADS, decoder_heads=DHEADS)
    assert (cfg["dim"], cfg["depth"], cfg["heads"], cfg["patch_size"], cfg["img_size"]) == (D, DEPTH, HEADS, PATCH, 32)
    assert cfg["mlp_ratio"] * D == MLP and cfg["num_tokens"] == R and cfg["ln_eps"] == 1e-12
    assert cfg["decoder"] == {"dim": DD, "depth": DDEPTH, "heads": DHEADS, "mlp_dim": DMLP, "head": "pixels",
                              "vocab": 1024}
    assert cfg["clustering"] == {"hidden": HIDDEN, "bottleneck": BOTTLENECK, "prototypes": PROTOS}


def test_default_heads_by_width(gen):
    sd = fake_public_state_dict(gen)
    with pytest.raises(ValueError, match="head count"):
        load_official(sd)                                   # width 32 is in no standard table
    cfg = infer_config({**sd, "sparse_tokens": torch.randn(R, 768)}, decoder_heads=DHEADS)
    assert cfg["heads"] == 12


@pytest.mark.parametrize("size", [(32, 32), (48, 48), (40, 24)])
def test_encode_decode_match_hf_formulation(gen, size):
    sd = fake_public_state_dict(gen)
    images = torch.rand(2, 3, *size, generator=gen)
    ref = reference_encode(sd, images)
    h, w = size[0] // PATCH, size[1] // PATCH
    # float64: the same formulas, to rounding.
    model64 = _load(sd).double()
    got = model64.encode(images.double())
    for k in ("cls", "dense", "sparse"):
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-10, msg=k)
    # stellar.kernels.reference takes the spatial softmax in float32 even for float64 inputs.
    for k in ("L", "Z"):
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-6, msg=k)
    torch.testing.assert_close(model64.decode(ref["Z"], (h, w)), reference_decode(sd, ref["Z"], h, w),
                               rtol=1e-10, atol=1e-10)
    # float32: the model as shipped, to float32 precision.
    model = _load(sd)
    assert not model.training
    got = model.encode(images)
    for k in ref:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k].double(), ref[k], rtol=1e-5, atol=1e-5, msg=k)
    rec = model.decode(got["Z"], (h, w))
    assert rec.shape == (2, 3, *size)
    torch.testing.assert_close(rec.double(), reference_decode(sd, ref["Z"], h, w), rtol=1e-5, atol=1e-5)


def test_clustering_heads_loaded(gen):
    sd = fake_public_state_dict(gen)
    model = _load(sd).double()
    x = torch.randn(3, D, generator=gen, dtype=torch.float64)
    s = {k: v.double() for k, v in sd.items()}
    for ours, theirs in ((model.clustering_head, "clustering_head"), (model.cls_head, "cls_cluster_head")):
        z = _lin(F.gelu(_lin(x, s, f"{theirs}.predictor.layers.0")), s, f"{theirs}.predictor.layers.2")
        want = F.normalize(z, dim=-1, eps=1e-7) @ s[f"{theirs}.layer.weight"].T
        torch.testing.assert_close(ours(x), want, rtol=1e-10, atol=1e-10)
    model32 = _load(sd)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model32.clustering_head(x.float()).dtype == torch.float32     # logits in fp32


def test_token_head(gen):
    sd = fake_public_state_dict(gen, head="tokens", vocab=11)
    model = _load(sd)
    assert model.cfg["decoder"]["head"] == "tokens" and model.cfg["decoder"]["vocab"] == 11
    images = torch.rand(2, 3, 32, 32, generator=gen)
    ref = reference_encode(sd, images)
    logits = model.decode(model.encode(images)["Z"])
    assert logits.shape == (2, SIDE * SIDE, 11)
    torch.testing.assert_close(logits.double(), reference_decode(sd, ref["Z"], SIDE, SIDE), rtol=1e-5, atol=1e-5)


def test_ignored_keys_accepted(gen):
    sd = fake_public_state_dict(gen)
    sd["teacher_sparse_tokens"] = torch.randn(R, D, generator=gen)
    sd["teacher_encoder.embeddings.cls_token"] = torch.randn(1, 1, D, generator=gen)
    sd["teacher_head.layer.weight"] = torch.randn(PROTOS, BOTTLENECK, generator=gen)
    sd["teacher_cls_head.layer.weight"] = torch.randn(PROTOS, BOTTLENECK, generator=gen)
    model = _load(sd)
    assert "decoder.embeddings.cls_token" in sd and "encoder.pooler.dense.weight" in sd
    torch.testing.assert_close(model.encoder.sparse_tokens, sd["sparse_tokens"])


def test_unknown_and_missing_keys_listed(gen):
    sd = fake_public_state_dict(gen)
    sd["encoder.embeddings.mystery"] = torch.randn(3)
    sd["extra_head.weight"] = torch.randn(3)
    del sd["dense_proj.bias"]
    del sd["encoder.encoder.layer.1.attention.attention.key.weight"]
    with pytest.raises(ValueError) as err:
        _load(sd)
    msg = str(err.value)
    for key in ("encoder.embeddings.mystery", "extra_head.weight", "dense_proj.bias",
                "encoder.encoder.layer.1.attention.attention.key.weight"):
        assert key in msg, (key, msg)


def test_shape_mismatch_is_an_error(gen):
    sd = fake_public_state_dict(gen)
    sd["cls_cluster_head.layer.weight"] = torch.randn(PROTOS + 1, BOTTLENECK, generator=gen)
    with pytest.raises(ValueError, match="cls_head.prototypes.weight"):
        _load(sd)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_loads_files(gen, tmp_path, fmt):
    sd = fake_public_state_dict(gen)
    path = tmp_path / f"stellar.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}}, path)
    model = _load(str(path), temperature=0.1)
    assert model.cfg["temperature"] == 0.1
    torch.testing.assert_close(model.encoder.vit.pos_embed, sd["encoder.embeddings.position_embeddings"])
    with pytest.raises(FileNotFoundError, match="state_dict_or_path"):
        load_official(str(tmp_path / "absent.safetensors"))

"""The MAE start (model.init): HF ViTMAE and timm key layouts, against the libraries' own encoders."""
import pytest
import torch
from safetensors.torch import save_file

from stellar.model import build_model
from stellar.model.mae import detect_layout, load_mae
from stellar.nn.vit import VisionTransformer

DIM, DEPTH, HEADS, MLP, PATCH, IMG = 32, 2, 4, 64, 8, 32


def tiny_vit(ln_eps=1e-6, seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=IMG, patch_size=PATCH, dim=DIM, depth=DEPTH, heads=HEADS,
                             mlp_ratio=MLP / DIM, ln_eps=ln_eps)


def random_tensors(names_shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) for k, s in names_shapes.items()}


def hf_file_names():
    """The names of a Hugging Face ViTMAEModel file (save_pretrained / facebook/vit-mae-base), written out."""
    n = (IMG // PATCH) ** 2
    out = {"embeddings.cls_token": (1, 1, DIM), "embeddings.position_embeddings": (1, n + 1, DIM),
           "embeddings.patch_embeddings.projection.weight": (DIM, 3, PATCH, PATCH),
           "embeddings.patch_embeddings.projection.bias": (DIM,),
           "layernorm.weight": (DIM,), "layernorm.bias": (DIM,)}
    for i in range(DEPTH):
        p = f"encoder.layer.{i}."
        for part in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                     "attention.output.dense"):
            out[p + part + ".weight"], out[p + part + ".bias"] = (DIM, DIM), (DIM,)
        out[p + "intermediate.dense.weight"], out[p + "intermediate.dense.bias"] = (MLP, DIM), (MLP,)
        out[p + "output.dense.weight"], out[p + "output.dense.bias"] = (DIM, MLP), (DIM,)
        for ln in ("layernorm_before", "layernorm_after"):
            out[p + ln + ".weight"], out[p + ln + ".bias"] = (DIM,), (DIM,)
    return out


def timm_names():
    """The names of timm's vit_*_patch16_224.mae state dict (and the MAE release), written out."""
    n = (IMG // PATCH) ** 2
    out = {"cls_token": (1, 1, DIM), "pos_embed": (1, n + 1, DIM), "patch_embed.proj.weight": (DIM, 3, PATCH, PATCH),
           "patch_embed.proj.bias": (DIM,), "norm.weight": (DIM,), "norm.bias": (DIM,)}
    for i in range(DEPTH):
        p = f"blocks.{i}."
        out[p + "attn.qkv.weight"], out[p + "attn.qkv.bias"] = (3 * DIM, DIM), (3 * DIM,)
        out[p + "attn.proj.weight"], out[p + "attn.proj.bias"] = (DIM, DIM), (DIM,)
        out[p + "mlp.fc1.weight"], out[p + "mlp.fc1.bias"] = (MLP, DIM), (MLP,)
        out[p + "mlp.fc2.weight"], out[p + "mlp.fc2.bias"] = (DIM, MLP), (DIM,)
        for ln in ("norm1", "norm2"):
            out[p + ln + ".weight"], out[p + ln + ".bias"] = (DIM,), (DIM,)
    return out


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_hf_file_layout_lands_on_the_right_parameters(tmp_path, suffix):
    sd = random_tensors(hf_file_names(), 1)
    sd_full = {f"vit.{k}": v for k, v in sd.items()}                       # ViTMAEForPreTraining
    sd_full["decoder.decoder_embed.weight"] = torch.randn(16, DIM)          # the MAE decoder: skipped
    path = tmp_path / f"mae{suffix}"
    save_file(sd_full, str(path)) if suffix == ".safetensors" else torch.save({"model": sd_full}, path)
    vit = tiny_vit()
    assert load_mae(vit, path) == "hf"
    own = vit.state_dict()
    assert torch.equal(own["cls_token"], sd["embeddings.cls_token"])
    assert torch.equal(own["pos_embed"], sd["embeddings.position_embeddings"])
    assert torch.equal(own["patch_embed.proj.weight"], sd["embeddings.patch_embeddings.projection.weight"])
    assert torch.equal(own["transformer.norm.bias"], sd["layernorm.bias"])
    p = "encoder.layer.1."
    q, k, v = (sd[p + f"attention.attention.{n}.weight"] for n in ("query", "key", "value"))
    assert torch.equal(own["transformer.blocks.1.attn.qkv.weight"][:DIM], q)
    assert torch.equal(own["transformer.blocks.1.attn.qkv.weight"][DIM:2 * DIM], k)
    assert torch.equal(own["transformer.blocks.1.attn.qkv.weight"][2 * DIM:], v)
    assert torch.equal(own["transformer.blocks.1.attn.qkv.bias"][2 * DIM:], sd[p + "attention.attention.value.bias"])
    assert torch.equal(own["transformer.blocks.1.attn.proj.weight"], sd[p + "attention.output.dense.weight"])
    assert torch.equal(own["transformer.blocks.1.mlp.fc1.weight"], sd[p + "intermediate.dense.weight"])
    assert torch.equal(own["transformer.blocks.1.mlp.fc2.bias"], sd[p + "output.dense.bias"])
    assert torch.equal(own["transformer.blocks.1.norm1.weight"], sd[p + "layernorm_before.weight"])
    assert torch.equal(own["transformer.blocks.1.norm2.bias"], sd[p + "layernorm_after.bias"])


def test_timm_layout_lands_on_the_right_parameters(tmp_path):
    sd = random_tensors(timm_names(), 2)
    sd["mask_token"] = torch.randn(1, 1, DIM)                              # MAE release extras: skipped
    sd["decoder_pred.weight"] = torch.randn(7, 16)
    save_file(sd, str(tmp_path / "timm.safetensors"))
    vit = tiny_vit()
    assert load_mae(vit, tmp_path / "timm.safetensors") == "timm"
    own = vit.state_dict()
    assert torch.equal(own["pos_embed"], sd["pos_embed"])
    assert torch.equal(own["transformer.blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    assert torch.equal(own["transformer.blocks.1.mlp.fc2.weight"], sd["blocks.1.mlp.fc2.weight"])
    assert torch.equal(own["transformer.norm.weight"], sd["norm.weight"])


def test_errors_list_the_keys(tmp_path):
    sd = random_tensors(hf_file_names(), 3)
    bad = dict(sd)
    del bad["encoder.layer.1.attention.attention.key.bias"]
    bad["encoder.layer.1.extra.weight"] = torch.randn(3)
    with pytest.raises(ValueError) as info:
        load_mae(tiny_vit(), bad)
    msg = str(info.value)
    assert "model.init" in msg and "encoder.layer.1.attention.attention.key.bias" in msg
    assert "unexpected keys ['encoder.layer.1.extra.weight']" in msg
    deeper = random_tensors({**hf_file_names(), "encoder.layer.2.output.dense.bias": (DIM,)}, 4)
    with pytest.raises(ValueError, match=r"unexpected keys \['encoder.layer.2.output.dense.bias'\]"):
        load_mae(tiny_vit(), deeper)
    wide = {k: (torch.randn(1, 1 + (IMG // PATCH) ** 2 * 4, DIM) if k == "pos_embed" else v)
            for k, v in random_tensors(timm_names(), 5).items()}
    with pytest.raises(ValueError, match=r"pos_embed \(1, 65, 32\) \(the model needs \(1, 17, 32\)\)"):
        load_mae(tiny_vit(), wide)
    with pytest.raises(ValueError, match="not an MAE ViT checkpoint"):
        detect_layout(["foo.weight", "bar.bias"])
    with pytest.raises(FileNotFoundError, match="model.init: no weights file"):
        load_mae(tiny_vit(), tmp_path / "absent.safetensors")


def test_build_model_starts_from_model_init_and_checkpoints_do_not_need_it(tmp_path):
    from stellar.train.checkpoint import load_pretrained, save_checkpoint

    cfg = {"arch": "tiny", "dim": DIM, "depth": DEPTH, "heads": HEADS, "mlp_ratio": MLP / DIM, "patch_size": PATCH,
           "img_size": IMG, "num_tokens": 4, "decoder": {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32},
           "clustering": {"hidden": 16, "bottleneck": 8, "prototypes": 8}, "ema": {"enabled": True}}
    sd = random_tensors(timm_names(), 6)
    save_file(sd, str(tmp_path / "mae.safetensors"))
    torch.manual_seed(0)
    fresh = build_model(cfg)
    torch.manual_seed(0)
    model = build_model({**cfg, "init": str(tmp_path / "mae.safetensors")})
    assert torch.equal(model.encoder.vit.transformer.blocks[1].mlp.fc1.weight, sd["blocks.1.mlp.fc1.weight"])
    assert torch.equal(model.teacher["encoder"].vit.pos_embed, sd["pos_embed"])          # EMA starts as the student
    assert torch.equal(model.encoder.sparse_tokens, fresh.encoder.sparse_tokens)        # not from MAE
    assert torch.equal(model.decoder.proj.weight, fresh.decoder.proj.weight)
    assert not torch.equal(fresh.encoder.vit.pos_embed, sd["pos_embed"])
    with pytest.raises(ValueError, match="model.init must be"):
        build_model({**cfg, "init": 3})
    with pytest.raises(FileNotFoundError, match="model.init"):
        build_model({**cfg, "init": str(tmp_path / "nope.pt")})
    # A trained run is rebuilt from its checkpoint: the MAE file may be gone by then.
    model_cfg = {**cfg, "init": str(tmp_path / "mae.safetensors")}
    save_checkpoint(tmp_path / "run", 1, model, {}, config={"model": model_cfg})
    (tmp_path / "mae.safetensors").unlink()
    loaded, _, _ = load_pretrained(tmp_path / "run")
    assert torch.equal(loaded.encoder.vit.transformer.blocks[1].mlp.fc1.weight, sd["blocks.1.mlp.fc1.weight"])


# ---------------------------------------------------------------- against the libraries' own encoders

def _images(seed=7):
    return torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def test_matches_transformers_vit_mae(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTMAEConfig(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                    intermediate_size=MLP, image_size=IMG, patch_size=PATCH, mask_ratio=0.0,
                                    decoder_hidden_size=16, decoder_num_hidden_layers=1,
                                    decoder_num_attention_heads=2, decoder_intermediate_size=32)
    torch.manual_seed(11)
    hf = transformers.ViTMAEForPreTraining(cfg).eval()
    with torch.no_grad():                            # the fixed sin-cos table would hide a position mix-up
        hf.vit.embeddings.position_embeddings.normal_()
    hf.save_pretrained(tmp_path / "hf")              # the file layout: vit.encoder.layer.{i}.attention.attention.query...
    x = _images()
    n = (IMG // PATCH) ** 2
    noise = torch.arange(n, dtype=torch.float32).expand(x.shape[0], n)     # keep every patch, in order
    with torch.no_grad():
        want = hf.vit(pixel_values=x, noise=noise).last_hidden_state
        for source, layout in ((tmp_path / "hf" / "model.safetensors", "hf"), (hf.vit.state_dict(), None)):
            vit = tiny_vit(ln_eps=cfg.layer_norm_eps, seed=1).eval()
            got_layout = load_mae(vit, source)
            assert layout is None or got_layout == layout
            torch.testing.assert_close(vit(x), want, rtol=1e-4, atol=1e-4)


def test_matches_timm_vit(tmp_path):
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(12)
    ref = TimmViT(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                  mlp_ratio=MLP / DIM, num_classes=0, global_pool="token").eval()
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    vit = tiny_vit(ln_eps=1e-6, seed=2).eval()
    assert load_mae(vit, tmp_path / "timm.pth") == "timm"
    x = _images(8)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), ref.forward_features(x), rtol=1e-4, atol=1e-4)
    assert timm.__version__

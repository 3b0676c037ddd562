"""The MaskGIT-VQGAN tokenizer encoder (STELLAR.md section 3) with random weights.

A functional float64 reference is written here from the spec's facts (F.conv2d / F.group_norm
over the state dict), including the residual-on-output quirk, and the released key layout
and shapes are checked for the default configuration.
"""
import pytest
import torch
import torch.nn.functional as F

from stellar.model.tokenizer import VQGANResidualBlock, VQGANTokenizer, nearest_code

f64 = torch.float64
TINY = dict(hidden_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, z_channels=8, codebook_size=16)


def randomize(module, gen):
    """Every parameter (GroupNorm affines included) from a fresh random draw, never defaults."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("embedding.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen) if "norm" in name and name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
    return module


def tiny(gen, **kw):
    return randomize(VQGANTokenizer(**{**TINY, **kw}), gen)


# ----------------------------------------------------------------------------- reference
def ref_block(sd, prefix, x):
    """GroupNorm(32, 1e-6) -> SiLU -> 3x3 conv, twice; shortcut: x, or 1x1 conv of the OUTPUT."""
    h = F.silu(F.group_norm(x, 32, sd[prefix + "norm1.weight"], sd[prefix + "norm1.bias"], eps=1e-6))
    h = F.conv2d(h, sd[prefix + "conv1.weight"], padding=1)
    h = F.silu(F.group_norm(h, 32, sd[prefix + "norm2.weight"], sd[prefix + "norm2.bias"], eps=1e-6))
    h = F.conv2d(h, sd[prefix + "conv2.weight"], padding=1)
    if prefix + "nin_shortcut.weight" in sd:
        return h + F.conv2d(h, sd[prefix + "nin_shortcut.weight"])
    return h + x


def ref_features(sd, images, levels, blocks):
    sd = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(images.double(), sd["encoder.conv_in.weight"], padding=1)
    for i in range(levels):
        for j in range(blocks):
            x = ref_block(sd, f"encoder.down.{i}.block.{j}.", x)
        if i < levels - 1:
            x = F.avg_pool2d(x, 2)
    for j in range(blocks):
        x = ref_block(sd, f"encoder.mid.{j}.", x)
    x = F.silu(F.group_norm(x, 32, sd["encoder.norm_out.weight"], sd["encoder.norm_out.bias"], eps=1e-6))
    return F.conv2d(x, sd["encoder.conv_out.weight"], sd["encoder.conv_out.bias"])


def ref_codes(z, codebook):
    """Brute-force nearest codebook vector per cell, float64."""
    z, codebook = z.double(), codebook.double()
    B, C, h, w = z.shape
    out = torch.empty(B, h, w, dtype=torch.int64)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                out[b, i, j] = ((codebook - z[b, :, i, j]) ** 2).sum(1).argmin()
    return out


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("size", [(16, 16), (8, 20)])
def test_codes_shape_dtype_range(size, gen):
    tok = tiny(gen)
    images = torch.rand(2, 3, *size, generator=gen)
    codes = tok(images)
    assert codes.dtype == torch.int64 and codes.shape == (2, size[0] // 4, size[1] // 4)
    assert (codes >= 0).all() and (codes < 16).all()
    assert codes.unique().numel() > 1                      # a live codebook, not a constant


def test_codes_are_nearest_codebook_of_own_features(gen):
    tok = tiny(gen)
    images = torch.rand(3, 3, 12, 16, generator=gen)
    z = tok.encode_features(images)
    assert z.shape == (3, 8, 3, 4)
    assert torch.equal(tok(images), ref_codes(z, tok.quantize.embedding.weight))
    assert torch.equal(nearest_code(z, tok.quantize.embedding.weight), ref_codes(z, tok.quantize.embedding.weight))


def test_features_match_functional_float64_reference(gen):
    tok = tiny(gen)
    images = torch.rand(2, 3, 16, 12, generator=gen)
    ref = ref_features(tok.state_dict(), images, levels=3, blocks=2)
    torch.testing.assert_close(tok.encode_features(images).double(), ref, rtol=1e-4, atol=1e-4)
    tok64 = tiny(torch.Generator().manual_seed(0)).double()
    ref64 = ref_features(tok64.state_dict(), images, levels=3, blocks=2)
    torch.testing.assert_close(tok64.encode_features(images.double()), ref64, rtol=1e-10, atol=1e-10)


def test_width_change_residual_is_a_conv_of_the_block_output(gen):
    """h + W h (released), not h + W x: W is out x out and the value says which."""
    blk = randomize(VQGANResidualBlock(32, 64), gen).double()
    assert tuple(blk.nin_shortcut.weight.shape) == (64, 64, 1, 1) and blk.nin_shortcut.bias is None
    x = torch.randn(2, 32, 5, 6, generator=gen, dtype=f64)
    with torch.no_grad():
        h = blk.conv2(F.silu(blk.norm2(blk.conv1(F.silu(blk.norm1(x))))))
        out = blk(x)
        torch.testing.assert_close(out, h + F.conv2d(h, blk.nin_shortcut.weight))
        # the usual input residual (a 1x1 conv of x, here its first 32 input channels) differs
        usual = h + F.conv2d(x, blk.nin_shortcut.weight[:, :32])
        assert (out - usual).abs().max() > 1e-2
    same = randomize(VQGANResidualBlock(32, 32), gen).double()
    assert not hasattr(same, "nin_shortcut")
    with torch.no_grad():
        h = same.conv2(F.silu(same.norm2(same.conv1(F.silu(same.norm1(x))))))
        torch.testing.assert_close(same(x), h + x)


def test_released_configuration_layout():
    tok = VQGANTokenizer()
    sd = tok.state_dict()
    assert tuple(sd["encoder.conv_in.weight"].shape) == (128, 3, 3, 3) and "encoder.conv_in.bias" not in sd
    assert tuple(sd["quantize.embedding.weight"].shape) == (1024, 256)
    assert tuple(sd["encoder.conv_out.weight"].shape) == (256, 512, 1, 1) and "encoder.conv_out.bias" in sd
    assert sorted(k for k in sd if "nin_shortcut" in k) == [
        "encoder.down.2.block.0.nin_shortcut.weight", "encoder.down.4.block.0.nin_shortcut.weight"]
    assert tuple(sd["encoder.down.4.block.1.conv2.weight"].shape) == (512, 512, 3, 3)
    assert len([k for k in sd if k.startswith("encoder.mid.")]) == 2 * 6
    assert not any(k.endswith("conv1.bias") or k.endswith("conv2.bias") for k in sd)
    assert tok.downsample_factor == 16
    codes = tok(torch.rand(1, 3, 32, 48))
    assert codes.shape == (1, 2, 3) and codes.dtype == torch.int64


def test_frozen_eval_and_no_grad(gen):
    tok = tiny(gen)
    assert not any(p.requires_grad for p in tok.parameters())
    tok.train()
    assert not tok.training
    images = torch.rand(1, 3, 8, 8, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = tok(images)
    assert not codes.requires_grad
    assert torch.equal(codes, tok(images.detach()))         # autocast does not move codes


def test_resize_to_resizes_bicubically(gen):
    tok = tiny(gen, resize_to=16)
    images = torch.rand(2, 3, 14, 14, generator=gen)
    codes = tok(images)
    assert codes.shape == (2, 4, 4)
    resized = F.interpolate(images, size=(16, 16), mode="bicubic", align_corners=False).clamp(0, 1)
    plain = tiny(gen)
    plain.load_state_dict(tok.state_dict())
    assert torch.equal(codes, plain(resized))
    assert torch.equal(tok(resized), codes)                 # already 16 px: untouched


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_from_file_round_trip_ignores_decoder(tmp_path, suffix, gen):
    tok = tiny(gen)
    sd = {k: v.clone() for k, v in tok.state_dict().items()}
    sd["decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3, generator=gen)   # released files carry it
    path = tmp_path / f"vq{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    loaded = VQGANTokenizer.from_file(path)
    assert loaded.codebook_size == 16 and loaded.downsample_factor == 4
    images = torch.rand(2, 3, 8, 12, generator=gen)
    assert torch.equal(loaded(images), tok(images))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_from_state_dict_names_bad_keys(tmp_path, gen):
    sd = tiny(gen).state_dict()
    extra = dict(sd, **{"encoder.surprise.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="encoder.surprise.weight"):
        VQGANTokenizer.from_state_dict(extra)
    missing = {k: v for k, v in sd.items() if k != "encoder.norm_out.bias"}
    with pytest.raises(ValueError, match="encoder.norm_out.bias"):
        VQGANTokenizer.from_state_dict(missing)
    with pytest.raises(ValueError, match="quantize.embedding.weight"):
        VQGANTokenizer.from_state_dict({k: v for k, v in sd.items() if not k.startswith("quantize")})
    with pytest.raises(FileNotFoundError, match="path"):
        VQGANTokenizer.from_file(tmp_path / "absent.safetensors")


def test_bad_images_are_named(gen):
    tok = tiny(gen)
    with pytest.raises(ValueError, match="images"):
        tok(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="multiples of 4"):
        tok(torch.rand(1, 3, 10, 8))

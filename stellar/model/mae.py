"""Start the encoder from MAE ViT weights (STELLAR.md section 6: ViT-B/16 starts from MAE).

    load_mae(model.encoder.vit, "vit-mae-base/model.safetensors")     # or set model.init: PATH

A local file (``.safetensors`` or a torch file, read with ``weights_only=True``; nothing is
downloaded) in one of these key layouts; the layout is recognised from the names:

- ``hf``: Hugging Face ``ViTMAEModel`` as its files store it (``facebook/vit-mae-base``,
  ``save_pretrained``): ``embeddings.cls_token``, ``embeddings.position_embeddings``,
  ``embeddings.patch_embeddings.projection.{weight,bias}``,
  ``encoder.layer.{i}.attention.attention.{query,key,value}.*``,
  ``encoder.layer.{i}.attention.output.dense.*``, ``encoder.layer.{i}.intermediate.dense.*``,
  ``encoder.layer.{i}.output.dense.*``, ``encoder.layer.{i}.layernorm_{before,after}.*``,
  ``layernorm.*``.
- ``hf5``: the same model's in-memory ``state_dict()`` under transformers 5
  (``layers.{i}.attention.{q,k,v,o}_proj.*``, ``layers.{i}.mlp.fc{1,2}.*``, ...).
- ``timm``: ``vit_base_patch16_224.mae`` and the original MAE release: ``cls_token``,
  ``pos_embed``, ``patch_embed.proj.*``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,
  mlp.fc2}.*``, ``norm.*``.

Wrappers are removed first: ``{"model": ...}`` / ``{"state_dict": ...}``, and the ``vit.``
prefix of ``ViTMAEForPreTraining``. The MAE *decoder* (``decoder.*`` in HF files; ``mask_token``,
``decoder_*`` in timm/MAE files) is not part of the encoder and is skipped. Anything else that
does not fit -- a missing key, an unexpected key, a shape that differs from the model's -- is a
ValueError listing every such key in the file's own names. HF's separate query/key/value become
our fused ``qkv`` (rows ``[q; k; v]``, which is timm's order too). The sparse tokens, the
factorization, the decoder and the heads keep their fresh initialisation.

Layer-norm epsilon: HF's MAE uses 1e-12, timm's 1e-6 (``model.ln_eps``, default 1e-6); the
difference is below float32 rounding for trained weights.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from stellar.model.weights import read_state_dict

__all__ = ["LAYOUTS", "detect_layout", "layout_names", "convert_mae", "load_mae"]

LAYOUTS = ("hf", "hf5", "timm")

# Our VisionTransformer parameter (inside a block) -> each layout's name for it.
_BLOCK = {
    "norm1": {"hf": "layernorm_before", "hf5": "layernorm_before", "timm": "norm1"},
    "attn.proj": {"hf": "attention.output.dense", "hf5": "attention.o_proj", "timm": "attn.proj"},
    "norm2": {"hf": "layernorm_after", "hf5": "layernorm_after", "timm": "norm2"},
    "mlp.fc1": {"hf": "intermediate.dense", "hf5": "mlp.fc1", "timm": "mlp.fc1"},
    "mlp.fc2": {"hf": "output.dense", "hf5": "mlp.fc2", "timm": "mlp.fc2"},
}
_QKV = {"hf": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
        "hf5": ("attention.q_proj", "attention.k_proj", "attention.v_proj")}
_LAYER_PREFIX = {"hf": "encoder.layer.", "hf5": "layers.", "timm": "blocks."}
# Our non-block parameters -> each layout's name.
_DIRECT = {
    "cls_token": {"hf": "embeddings.cls_token", "timm": "cls_token"},
    "pos_embed": {"hf": "embeddings.position_embeddings", "timm": "pos_embed"},
    "patch_embed.proj.weight": {"hf": "embeddings.patch_embeddings.projection.weight", "timm": "patch_embed.proj.weight"},
    "patch_embed.proj.bias": {"hf": "embeddings.patch_embeddings.projection.bias", "timm": "patch_embed.proj.bias"},
    "transformer.norm.weight": {"hf": "layernorm.weight", "timm": "norm.weight"},
    "transformer.norm.bias": {"hf": "layernorm.bias", "timm": "norm.bias"},
}
# The MAE decoder and its mask token: in the pretraining checkpoints, never in the encoder.
_SKIPPED = {"hf": ("decoder.",), "hf5": ("decoder.",), "timm": ("mask_token", "decoder_")}
_OURS_BLOCK = re.compile(r"^transformer\.blocks\.(\d+)\.(.+)\.(weight|bias)$")


def _unwrap(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    for key in ("model", "state_dict"):
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError("an MAE checkpoint must hold a non-empty mapping of names to tensors")
    sd = dict(sd)
    if any(k.startswith("vit.") for k in sd):           # ViTMAEForPreTraining: vit.* + decoder.*
        sd = {(k[len("vit."):] if k.startswith("vit.") else k): v for k, v in sd.items()}
    return sd


def detect_layout(keys) -> str:
    """``"hf"``, ``"hf5"`` or ``"timm"`` from the key names (after unwrapping); ValueError otherwise."""
    keys = list(keys)
    if any(k.startswith("encoder.layer.") for k in keys):
        return "hf"
    if any(k.startswith("layers.") for k in keys) and any(k.startswith("embeddings.") for k in keys):
        return "hf5"
    if any(k.startswith("blocks.") for k in keys) and "cls_token" in keys:
        return "timm"
    raise ValueError(f"not an MAE ViT checkpoint in a known layout ({', '.join(LAYOUTS)}): first keys "
                     f"{sorted(keys)[:8]}")


def layout_names(ours: str, layout: str) -> list[str]:
    """The key(s) of ``layout`` that our VisionTransformer parameter ``ours`` is read from."""
    m = _OURS_BLOCK.match(ours)
    if m:
        layer, name, leaf = m.groups()
        prefix = f"{_LAYER_PREFIX[layout]}{layer}."
        if name == "attn.qkv":
            if layout == "timm":
                return [f"{prefix}attn.qkv.{leaf}"]
            return [f"{prefix}{part}.{leaf}" for part in _QKV[layout]]
        if name in _BLOCK:
            return [f"{prefix}{_BLOCK[name][layout]}.{leaf}"]
    elif ours in _DIRECT:
        return [_DIRECT[ours]["hf" if layout == "hf5" else layout]]
    raise ValueError(f"no {layout} name for the ViT parameter {ours!r}")


def convert_mae(sd: Mapping[str, Tensor], expected: Mapping[str, Tensor],
                arg: str = "model.init") -> dict[str, Tensor]:
    """``sd`` (any accepted layout) -> our VisionTransformer names, checked against ``expected``
    (the model's ``vit.state_dict()``): every key present, none left over, every shape equal."""
    sd = _unwrap(sd)
    layout = detect_layout(sd)
    skipped = _SKIPPED[layout]
    used: set[str] = set()
    out: dict[str, Tensor] = {}
    missing: list[str] = []
    bad_shapes: list[str] = []
    for ours, want in expected.items():
        names = layout_names(ours, layout)
        used.update(n for n in names if n in sd)
        absent = [n for n in names if n not in sd]
        if absent:
            missing += absent
            continue
        value = torch.cat([sd[n] for n in names], dim=0) if len(names) > 1 else sd[names[0]]
        if tuple(value.shape) != tuple(want.shape):
            bad_shapes.append(f"{' + '.join(names)} {tuple(value.shape)} (the model needs {tuple(want.shape)})")
            continue
        out[ours] = value
    unexpected = sorted(k for k in sd if k not in used and not k.startswith(skipped))
    if missing or unexpected or bad_shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {sorted(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if bad_shapes:
            parts.append("shapes that do not fit: " + "; ".join(bad_shapes))
        raise ValueError(f"{arg}: the {layout} MAE checkpoint does not fit the encoder "
                         f"(model.arch / dim / depth / patch_size / img_size / qkv_bias): " + "; ".join(parts))
    return out


def load_mae(vit: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
             arg: str = "model.init") -> str:
    """Copy MAE encoder weights into ``vit`` (a ``stellar.nn.vit.VisionTransformer``) in place.

    Returns the layout that was read. ``arg`` names the setting in errors.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        sd = read_state_dict(path_or_state_dict, arg)
    else:
        sd = path_or_state_dict
    own = vit.state_dict()
    converted = convert_mae(sd, own, arg)
    with torch.no_grad():
        for name, value in converted.items():
            own[name].copy_(value.to(own[name].dtype))
    return detect_layout(_unwrap(sd))

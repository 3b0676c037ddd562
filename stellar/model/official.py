"""Load checkpoints in the public STELLAR release's layout (STELLAR.md section 8).

The release stores Hugging Face ``ViTModel`` weights for the encoder (``encoder.*``) and the
decoder (``decoder.*``) plus ``sparse_tokens``, ``dense_proj``, ``sparse_proj``,
``decoder_proj``, ``position_embedding.positional_encoding_gaussian_matrix``,
``reconstruction_head``, ``clustering_head.{predictor.layers.0,2,layer}`` and
``cls_cluster_head.*``. Everything the model is built from is read off the tensor shapes;
HF's separate query/key/value become our fused qkv (rows ``[q; k; v]``).

Keys the public model carries but never uses are ignored: the ViT poolers, the decoder
ViTModel's own embeddings (patch, position, CLS), and the EMA-teacher copies. Any other unknown
or missing key raises a ValueError listing them.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from stellar.model.stellar import Stellar
from stellar.model.weights import read_state_dict

__all__ = ["load_official", "convert_official", "HEADS_BY_WIDTH", "IGNORED_PREFIXES"]

# Attention heads by width, for the public configurations (HF ViT-B/L/H; the decoder is 512/8).
HEADS_BY_WIDTH = {128: 4, 192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16}

IGNORED_PREFIXES = (
    "encoder.pooler.", "decoder.pooler.", "decoder.embeddings.",
    "teacher_encoder.", "teacher_sparse_tokens", "teacher_head.", "teacher_cls_head.",
)

_LAYER = re.compile(r"^(encoder|decoder)\.encoder\.layer\.(\d+)\.(.+)$")
# HF ViTLayer parameter -> our Block parameter (query/key/value handled apart).
_BLOCK = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
# Non-ViT tensors: public name prefix -> ours.
_DIRECT = {
    "sparse_tokens": "encoder.sparse_tokens",
    "encoder.embeddings.cls_token": "encoder.vit.cls_token",
    "encoder.embeddings.position_embeddings": "encoder.vit.pos_embed",
    "encoder.embeddings.patch_embeddings.projection.": "encoder.vit.patch_embed.proj.",
    "encoder.layernorm.": "encoder.vit.transformer.norm.",
    "decoder.layernorm.": "decoder.transformer.norm.",
    "dense_proj.": "factorization.dense_proj.",
    "sparse_proj.": "factorization.sparse_proj.",
    "decoder_proj.": "decoder.proj.",
    "position_embedding.positional_encoding_gaussian_matrix": "decoder.pos.positional_encoding_gaussian_matrix",
    "reconstruction_head.": "decoder.head.",
    "clustering_head.predictor.layers.": "clustering_head.mlp.",
    "clustering_head.layer.": "clustering_head.prototypes.",
    "cls_cluster_head.predictor.layers.": "cls_head.mlp.",
    "cls_cluster_head.layer.": "cls_head.prototypes.",
}


def _read(state_dict_or_path: Mapping[str, Tensor] | str | os.PathLike) -> dict[str, Tensor]:
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        sd = read_state_dict(state_dict_or_path, "state_dict_or_path")
    else:
        sd = state_dict_or_path
    if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]                                  # a Lightning checkpoint
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError("state_dict_or_path must be (a file holding) a mapping of names to tensors")
    sd = dict(sd)
    if sd and all(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items()}    # the Lightning module's prefix
    return sd


def convert_official(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename public-layout tensors to this package's names.

    Returns (converted state dict, unknown public keys). Ignored keys are dropped silently;
    q/k/v of each layer are concatenated into ``qkv`` (all three must be present).
    """
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    qkv: dict[tuple[str, str, str], dict[str, Tensor]] = {}
    for key, value in sd.items():
        if key.startswith(IGNORED_PREFIXES):
            continue
        m = _LAYER.match(key)
        if m:
            part, layer, rest = m.groups()
            root = "encoder.vit.transformer" if part == "encoder" else "decoder.transformer"
            qm = re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
            if qm:
                qkv.setdefault((root, layer, qm.group(2)), {})[qm.group(1)] = value
                continue
            name, _, leaf = rest.rpartition(".")
            if name in _BLOCK and leaf in ("weight", "bias"):
                out[f"{root}.blocks.{layer}.{_BLOCK[name]}.{leaf}"] = value
                continue
            unknown.append(key)
            continue
        for prefix, ours in _DIRECT.items():
            if key.startswith(prefix):
                out[ours + key[len(prefix):]] = value
                break
        else:
            unknown.append(key)
    for (root, layer, leaf), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            missing = sorted({"query", "key", "value"} - set(parts))
            part = "encoder" if root.startswith("encoder") else "decoder"
            unknown += [f"(missing) {part}.encoder.layer.{layer}.attention.attention.{p}.{leaf}" for p in missing]
            continue
        out[f"{root}.blocks.{layer}.attn.qkv.{leaf}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0)
    return out, unknown


def public_names(ours: str) -> list[str]:
    """The public-layout key(s) our parameter ``ours`` is loaded from (q/k/v for a fused qkv)."""
    m = re.match(r"^(encoder\.vit\.transformer|decoder\.transformer)\.blocks\.(\d+)\.(.+)\.(weight|bias)$", ours)
    if m:
        root, layer, name, leaf = m.groups()
        part = "encoder" if root.startswith("encoder") else "decoder"
        base = f"{part}.encoder.layer.{layer}."
        if name == "attn.qkv":
            return [f"{base}attention.attention.{p}.{leaf}" for p in ("query", "key", "value")]
        hf = {v: k for k, v in _BLOCK.items()}.get(name)
        if hf is not None:
            return [f"{base}{hf}.{leaf}"]
    for prefix, mine in _DIRECT.items():
        if ours.startswith(mine):
            return [prefix + ours[len(mine):]]
    return [ours]


def _depth(sd: Mapping[str, Tensor], part: str) -> int:
    layers = {int(m.group(2)) for k in sd if (m := _LAYER.match(k)) and m.group(1) == part}
    if not layers:
        raise ValueError(f"state_dict has no {part}.encoder.layer.* weights")
    if layers != set(range(len(layers))):
        raise ValueError(f"{part} layers are not numbered 0..{len(layers) - 1}: {sorted(layers)}")
    return len(layers)


def _need(sd: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in sd:
        raise ValueError(f"state_dict is missing {key!r}, needed to infer the model's shape")
    return sd[key]


def _heads(width: int, given: int | None, what: str) -> int:
    heads = given if given is not None else HEADS_BY_WIDTH.get(width)
    if heads is None:
        raise ValueError(f"no standard head count for {what} width {width}; pass it explicitly")
    if width % heads:
        raise ValueError(f"{what} width {width} is not divisible by {heads} heads")
    return heads


def infer_config(sd: Mapping[str, Tensor], num_heads: int | None = None,
                 decoder_heads: int | None = None) -> dict[str, Any]:
    """The `model:` config of a public-layout state dict, read from its tensor shapes."""
    r, D = _need(sd, "sparse_tokens").shape
    patch = _need(sd, "encoder.embeddings.patch_embeddings.projection.weight").shape[-1]
    n_pos = _need(sd, "encoder.embeddings.position_embeddings").shape[1] - 1
    side = int(round(n_pos ** 0.5))
    if side * side != n_pos:
        raise ValueError(f"encoder position embeddings hold {n_pos} patches, not a square grid")
    mlp = _need(sd, "encoder.encoder.layer.0.intermediate.dense.weight").shape[0]
    dec_dim = _need(sd, "decoder_proj.weight").shape[0]
    dec_mlp = _need(sd, "decoder.encoder.layer.0.intermediate.dense.weight").shape[0]
    rec = _need(sd, "reconstruction_head.weight")
    head = "pixels" if rec.dim() == 4 else "tokens"
    hidden = _need(sd, "clustering_head.predictor.layers.0.weight").shape[0]
    bottleneck = _need(sd, "clustering_head.predictor.layers.2.weight").shape[0]
    prototypes = _need(sd, "clustering_head.layer.weight").shape[0]
    return {
        "arch": {128: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}.get(D, "base"),
        "img_size": side * patch, "patch_size": patch, "dim": D, "depth": _depth(sd, "encoder"),
        "heads": _heads(D, num_heads, "encoder"), "mlp_ratio": mlp / D, "ln_eps": 1e-12,
        "qkv_bias": "encoder.encoder.layer.0.attention.attention.query.bias" in sd,
        "num_tokens": r,
        "decoder": {"dim": dec_dim, "depth": _depth(sd, "decoder"), "heads": _heads(dec_dim, decoder_heads, "decoder"),
                    "mlp_dim": dec_mlp, "head": head, "vocab": rec.shape[0] if head == "tokens" else 1024},
        "clustering": {"hidden": hidden, "bottleneck": bottleneck, "prototypes": prototypes},
    }


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def load_official(state_dict_or_path: Mapping[str, Tensor] | str | os.PathLike, num_heads: int | None = None,
                  **overrides: Any) -> Stellar:
    """Build a :class:`Stellar` from a checkpoint in the public release's layout.

    Args:
        state_dict_or_path: a state dict, or a ``.safetensors`` / torch file holding one
            (a Lightning ``{"state_dict": ...}`` and a ``model.`` prefix are unwrapped).
        num_heads: the encoder's attention heads (default: by width, 768 -> 12, 1024 -> 16,
            1280 -> 16, 384 -> 6, 192 -> 3).
        overrides: `model:` config keys applied over the inferred ones, e.g.
            ``temperature=0.06``, ``ln_eps=1e-12``, ``decoder={"heads": 8}``,
            ``clustering={"sk_temperature": 0.06}``.

    Returns the model in eval mode. Raises ValueError listing unknown or missing keys.
    """
    sd = _read(state_dict_or_path)
    dec_over = overrides.get("decoder")
    dec_heads = dec_over.get("heads") if isinstance(dec_over, Mapping) else None
    cfg = _merge(infer_config(sd, num_heads, dec_heads), overrides)
    model = Stellar(cfg)
    converted, unknown = convert_official(sd)
    own = model.state_dict()
    own_keys = {k for k in own if not k.startswith(("tokenizer.", "teacher."))}
    missing = sorted(n for k in own_keys - set(converted) for n in public_names(k))
    unknown += [k for k in converted if k not in own_keys and not k.startswith("(missing)")]
    if unknown or missing:
        raise ValueError(f"checkpoint does not match the STELLAR public layout: unknown keys "
                         f"{sorted(unknown)}; missing keys {missing}")
    bad = [k for k, v in converted.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError("checkpoint shapes do not match the inferred model: " + ", ".join(
            f"{k} {tuple(converted[k].shape)} (expected {tuple(own[k].shape)})" for k in bad))
    dtype = own["encoder.sparse_tokens"].dtype
    model.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=False)
    if model.teacher is not None:                      # an EMA teacher starts as the student
        model.teacher.load_state_dict({
            **{f"encoder.{k}": v for k, v in model.encoder.state_dict().items()},
            **{f"clustering_head.{k}": v for k, v in model.clustering_head.state_dict().items()},
            **{f"cls_head.{k}": v for k, v in model.cls_head.state_dict().items()},
        })
    return model.eval()

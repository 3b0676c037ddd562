"""The STELLAR model: encoder + sparse tokens, factorization, decoder, clustering heads, objective.

Public API (docs/design.md):
    encode(images[B,3,H,W] in [0,1]) -> {"cls" [B,1,D], "dense" [B,N,D], "sparse" [B,r,D],
                                          "L" [B,N,r], "Z" [B,N,D]}
    decode(Z[B,N,D]) -> pixels [B,3,H,W] (pixel head) or code logits [B,N,vocab] (token head)
    forward(batch) -> {"loss": total, "losses": {name: detached scalar}, "features": {...}}

The objective (STELLAR.md sections 3-6), per batch of B images:
    full image     recon (pixels MSE or VQ-token CE), clustering_loss (sparse head vs its own
                   Sinkhorn-Knopp targets), cls_clustering_loss (CLS head, same), KoLeo
    G masked views mask_loss: sparse head on each view's tokens vs the full image's targets
                   re-ordered by the OT match; cls_loss: CLS head vs the full image's CLS
                   targets; KoLeo on the views' tokens
    Lc local views cls_loss += CLS head vs the full image's CLS targets
    total = w_rec*recon + clustering_loss + cls_clustering_loss + mask_loss + cls_loss + w_koleo*koleo
with ``koleo = koleo(full) + koleo(masked views)`` (each a mean over its images, as the public
code). With the optional EMA teacher the targets come from a momentum copy of the encoder and
heads applied to the second global view (the public code's choice), matched by OT. The teacher is
updated by ``update_teacher()``, which the training loop calls after each optimizer step (not in
``forward``, so FSDP2 sees it outside the forward, its parameters sharded): the forward of step t
sees the teacher averaged over the student's weights up to those step t uses, as the public code's
update at the start of its forward gives (the teacher starts as a copy of the student, so its
first update there changes nothing).

``forward`` is a few named pieces (each compilable with static shapes, ``compile_pieces``):
    encode_views        the three view groups through the encoder: one packed pass
                        (``pack_views``; attention per group, ``attention``) or one call per group
    reconstruction      factorization, decoder, pixel/token loss of the full image
    image_targets       the full image's (or the teacher's) Sinkhorn-Knopp targets, its two
                        clustering losses and KoLeo
    masked_view_losses  OT matches, mask_loss, the views' CLS loss and KoLeo
    local_view_losses   the local views' CLS loss
The clustering losses go through ``stellar.kernels.prototype_cross_entropy`` (``clustering.fused``:
the [M, C] logits are never held; a view's rows index the full image's targets instead of a
repeated, gathered copy); ``fused: false`` keeps the public code's structure (head logits in
float32, ``repeat_interleave`` + gather of the targets, soft cross-entropy): the reference.
``fused: auto`` is the op on CUDA tensors while the loss pieces run eager, and the public
structure on the CPU (where the op would run its own [M, C] reference anyway) and once
``compile_pieces`` has compiled them: torch.compile fuses the plain loss faster than our kernels
(fwd+bwd at M 16384, C 16384 on an H200: 1.6 ms compiled, 4.2 ms fused, 6.6 ms eager; the fused
op holds 64 MB against 528 MB; benchmarks/RESULTS.md); ``true`` forces the op everywhere.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stellar.losses.clustering import sinkhorn_knopp, soft_cross_entropy
from stellar.losses.koleo import koleo_loss
from stellar.losses.matching import match_tokens
from stellar.losses.reconstruction import pixel_loss, token_loss
from stellar.model.decoder import HEADS, Decoder
from stellar.model.encoder import SparseTokenEncoder
from stellar.model.heads import ClusteringHead
from stellar.model.masking import num_keep, sample_keep_indices
from stellar.nn.factorization import SpatialSemanticFactorization
from stellar.nn.vit import ATTENTION_BACKENDS, VisionTransformer, vit_preset

__all__ = ["Stellar", "DEFAULT_CONFIG", "resolve_config", "LOSS_NAMES"]

LOSS_NAMES = ("recon", "clustering_loss", "cls_clustering_loss", "mask_loss", "cls_loss", "koleo")

# The `model:` config section (the paper's ViT-B/16 recipe). `null` for the ViT shape keys means
# "the preset's value"; `loss.w_rec: null` means 10 for the pixel head and 0.05 for the token head.
DEFAULT_CONFIG: dict[str, Any] = {
    "arch": "base",
    "img_size": None,
    "patch_size": None,
    "dim": None,
    "depth": None,
    "heads": None,
    "mlp_ratio": 4.0,
    "ln_eps": 1e-6,
    "qkv_bias": True,
    "num_tokens": 16,
    "temperature": 0.06,
    "init": None,          # a local MAE ViT checkpoint the encoder starts from (stellar/model/mae.py)
    "pack_views": True,
    "attention": "auto",
    "residual_bf16": False,
    "decoder": {"dim": 512, "depth": 6, "heads": 8, "mlp_dim": 2048, "head": "pixels", "vocab": 1024,
                "tokenizer": None},
    "clustering": {"hidden": 2048, "bottleneck": 256, "prototypes": 16384, "sk_temperature": 0.06,
                   "sk_iterations": 3, "ce_temperature": 0.12, "fused": "auto"},
    "masking": {"mask_ratio": 0.8, "focal": "gaussian", "focal_prob": 0.5},
    "loss": {"w_rec": None, "w_koleo": 0.1, "ot_epsilon": 0.1, "ot_iterations": 5},
    "ema": {"enabled": False, "momentum": 0.996},
}
_SECTIONS = ("decoder", "clustering", "masking", "loss", "ema")
FUSED_CHOICES = ("auto", True, False)
# The step's pieces that `compile_pieces` compiles as whole functions (the ViT blocks are compiled one by one).
COMPILED_PIECES = ("image_targets", "masked_view_losses", "local_view_losses")


def resolve_config(cfg: dict | None = None) -> dict[str, Any]:
    """Merge ``cfg`` over DEFAULT_CONFIG and fill the ViT shape from the arch preset.

    Unknown keys (at either level) raise a ValueError naming them.
    """
    if cfg is not None and not isinstance(cfg, Mapping):
        raise ValueError(f"cfg must be a mapping (the `model:` config section), got {type(cfg).__name__}")
    cfg = {} if cfg is None else dict(cfg)
    if isinstance(cfg.get("masking"), Mapping) and "keep_ratio" in cfg["masking"]:
        raise ValueError("model.masking.keep_ratio was replaced by model.masking.mask_ratio (the public "
                         "code's parameter: a view keeps int(N * (1 - mask_ratio)) patches); set "
                         f"mask_ratio={1 - cfg['masking']['keep_ratio']:g} instead")
    unknown = [k for k in cfg if k not in DEFAULT_CONFIG]
    out = copy.deepcopy(DEFAULT_CONFIG)
    for section in _SECTIONS:
        sub = cfg.pop(section, None) or {}
        if not isinstance(sub, Mapping):
            raise ValueError(f"model.{section} must be a mapping, got {type(sub).__name__}")
        unknown += [f"{section}.{k}" for k in sub if k not in DEFAULT_CONFIG[section]]
        out[section].update({k: v for k, v in sub.items() if k in DEFAULT_CONFIG[section]})
    if unknown:
        raise ValueError(f"unknown model config keys: {sorted(unknown)}; known: {sorted(DEFAULT_CONFIG)}")
    out.update({k: v for k, v in cfg.items() if k in DEFAULT_CONFIG})
    preset = vit_preset(out["arch"])
    for key, value in preset.items():
        if out[key] is None:
            out[key] = value
    if out["decoder"]["head"] not in HEADS:
        raise ValueError(f"model.decoder.head must be one of {HEADS}, got {out['decoder']['head']!r}")
    if out["masking"]["focal"] in ("none", "None"):
        out["masking"]["focal"] = None
    if out["loss"]["w_rec"] is None:
        out["loss"]["w_rec"] = 10.0 if out["decoder"]["head"] == "pixels" else 0.05
    if out["attention"] not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention must be one of {ATTENTION_BACKENDS}, got {out['attention']!r}")
    if out["clustering"]["fused"] not in FUSED_CHOICES:
        raise ValueError(f"model.clustering.fused must be one of auto, true, false; got {out['clustering']['fused']!r}")
    for key in ("pack_views", "residual_bf16"):
        if not isinstance(out[key], bool):
            raise ValueError(f"model.{key} must be true or false, got {out[key]!r}")
    if out["num_tokens"] < 2:
        raise ValueError(f"model.num_tokens must be >= 2 (KoLeo needs a neighbour), got {out['num_tokens']}")
    return out


class Stellar(nn.Module):
    """STELLAR: sparse concept tokens S, localization L, Z = L S, decoder and clustering heads.

    Build with ``Stellar(cfg)`` (a `model:` config dict, see DEFAULT_CONFIG) or
    ``stellar.model.build_model(cfg)``. ``tokenizer``: a module mapping images [B,3,256,256] in
    [0,1] to code ids [B,h,w] or [B,N], needed by ``forward`` with the token head; it is frozen.
    """

    def __init__(self, cfg: dict | None = None, tokenizer: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg = resolve_config(cfg)
        vit = VisionTransformer(img_size=cfg["img_size"], patch_size=cfg["patch_size"], dim=cfg["dim"],
                                depth=cfg["depth"], heads=cfg["heads"], mlp_ratio=cfg["mlp_ratio"],
                                ln_eps=cfg["ln_eps"], qkv_bias=cfg["qkv_bias"])
        D = cfg["dim"]
        self.encoder = SparseTokenEncoder(vit, cfg["num_tokens"])
        self.factorization = SpatialSemanticFactorization(D, temperature=cfg["temperature"])
        dc = cfg["decoder"]
        self.decoder = Decoder(D, cfg["patch_size"], dim=dc["dim"], depth=dc["depth"], heads=dc["heads"],
                               mlp_dim=dc["mlp_dim"], head=dc["head"], vocab=dc["vocab"],
                               ln_eps=cfg["ln_eps"], qkv_bias=cfg["qkv_bias"])
        cc = cfg["clustering"]
        self.clustering_head = ClusteringHead(D, cc["hidden"], cc["bottleneck"], cc["prototypes"])
        self.cls_head = ClusteringHead(D, cc["hidden"], cc["bottleneck"], cc["prototypes"])
        if tokenizer is None and dc["head"] == "tokens" and dc["tokenizer"]:
            from stellar.model.tokenizer import VQGANTokenizer
            tokenizer = VQGANTokenizer.from_file(dc["tokenizer"])
        self.tokenizer = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)
        self.encoder.vit.transformer.attention = cfg["attention"]
        self.encoder.vit.transformer.residual_bf16 = cfg["residual_bf16"]
        self.decoder.transformer.residual_bf16 = cfg["residual_bf16"]
        self._prototype_ce = _prototype_ce_fn(cc["fused"])      # None: the public structure
        self._compiled: dict[str, Any] = {}
        self.teacher: nn.ModuleDict | None = None
        if cfg["ema"]["enabled"]:
            self.teacher = nn.ModuleDict({
                "encoder": copy.deepcopy(self.encoder),
                "clustering_head": copy.deepcopy(self.clustering_head),
                "cls_head": copy.deepcopy(self.cls_head),
            }).requires_grad_(False)

    # ------------------------------------------------------------------ public API
    @property
    def num_tokens(self) -> int:
        return self.encoder.num_tokens

    def set_tokenizer(self, tokenizer: nn.Module) -> None:
        """Attach a frozen tokenizer (images -> code ids) for the token head's loss."""
        self.tokenizer = tokenizer.eval().requires_grad_(False)

    def encode(self, images: Tensor) -> dict[str, Tensor]:
        """images: Tensor[B, 3, H, W] in [0, 1] -> dict of
        cls Tensor[B,1,D], dense Tensor[B,N,D], sparse Tensor[B,r,D], L Tensor[B,N,r], Z Tensor[B,N,D].
        """
        cls, dense, sparse = self.encoder(images)
        Z, L = self.factorization(dense, sparse)
        return {"cls": cls, "dense": dense, "sparse": sparse, "L": L, "Z": Z}

    def decode(self, Z: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """Z: Tensor[B, N, D] -> pixels Tensor[B, 3, H, W] (pixel head) or logits Tensor[B, N, vocab].

        grid: (h, w) patches, row-major (default: square).
        """
        return self.decoder.decode(Z, grid)

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        """batch: image [B,3,S,S] in [0,1], global_views [B,G,3,S,S], local_views [B,Lc,3,s,s]
        (G, Lc >= 0; either may be absent; any float dtype, bf16 included), and optionally keep
        LongTensor[B,G,n_keep]: the sorted patch indices each masked view keeps (the loaders draw
        them per sample, so the step holds no randomness of its own; without it the model draws
        them here with the global generator, ``model.masking``). Returns {"loss", "losses", "features"}.
        """
        image = _check_images("batch['image']", batch.get("image"), 4)
        B = image.shape[0]
        views = batch.get("global_views")
        local = batch.get("local_views")
        views = None if views is None else _check_images("batch['global_views']", views, 5, B)
        local = None if local is None else _check_images("batch['local_views']", local, 5, B)
        G = 0 if views is None else views.shape[1]
        Lc = 0 if local is None else local.shape[1]
        flat_views = views.flatten(0, 1) if G else None                                 # B*G x 3 x S x S
        flat_local = local.flatten(0, 1) if Lc else None                                # B*Lc x 3 x s x s
        keep = None
        if G:
            gh, gw = self.encoder.grid(flat_views)
            keep = self._keep_indices(batch.get("keep"), B, G, gh, gw, flat_views.device)  # B*G x n_keep
        lcfg = self.cfg["loss"]
        zero = image.new_zeros((), dtype=torch.float32)

        full, masked, local_out = self.encode_views(image, flat_views, keep, flat_local)
        cls, dense, sparse = full
        recon, L, recon_out = self.reconstruction(image, dense, sparse)
        t = self._piece("image_targets")(cls, sparse, image, views)
        mask_loss, cls_loss, koleo = zero, zero, t["koleo"]
        if G:
            mask_loss, cls_loss, koleo_m = self._piece("masked_view_losses")(
                masked[0], masked[2], t["sparse_tgt"], t["targets"], t["cls_targets"])
            koleo = koleo + koleo_m
        if Lc:
            cls_loss = cls_loss + self._piece("local_view_losses")(local_out[0], t["cls_targets"])

        total = (lcfg["w_rec"] * recon + t["clustering"] + t["cls_clustering"] + mask_loss + cls_loss
                 + lcfg["w_koleo"] * koleo)
        losses = dict(zip(LOSS_NAMES, (recon, t["clustering"], t["cls_clustering"], mask_loss, cls_loss, koleo)))
        features = {"cls": cls, "dense": dense, "sparse": sparse, "L": L,
                    "peak": L.detach().amax(dim=1), "recon": recon_out}
        return {"loss": total, "losses": {k: v.detach() for k, v in losses.items()}, "features": features}

    # ------------------------------------------------------------------ the step's pieces
    def encode_views(self, image: Tensor, views: Tensor | None, keep: Tensor | None,
                     local: Tensor | None) -> tuple:
        """The view groups through the encoder: image [B,3,S,S], views [B*G,3,S,S] with keep
        [B*G,n_keep], local [B*Lc,3,s,s] (views/local may be None). Returns (full, masked, local),
        each (cls, dense, sparse) or None. ``pack_views``: one packed pass (attention per group);
        otherwise one encoder call per group (the public code's structure)."""
        groups = [(image, None)]
        if views is not None:
            groups.append((views, keep))
        if local is not None:
            groups.append((local, None))
        if self.cfg["pack_views"] and len(groups) > 1:
            outs = self.encoder.forward_groups(groups)
        else:
            outs = [self.encoder(x, keep=k) for x, k in groups]
        full = outs.pop(0)
        masked = outs.pop(0) if views is not None else None
        local_out = outs.pop(0) if local is not None else None
        return full, masked, local_out

    def reconstruction(self, image: Tensor, dense: Tensor, sparse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Full image: factorization, decoder on Z (projected at rank r), reconstruction loss.
        Returns (recon loss, L [B,N,r], decoder output)."""
        grid = self.encoder.grid(image)
        dec_in, L = self.factorization(dense, sparse, out_proj=self.decoder.proj)      # B x N x 512
        recon_out = self.decoder(dec_in, grid)
        return self._recon_loss(recon_out, image, grid), L, recon_out

    def image_targets(self, cls: Tensor, sparse: Tensor, image: Tensor, views: Tensor | None) -> dict[str, Tensor]:
        """The targets from the full image (cls [B,1,D], sparse [B,r,D]): its own Sinkhorn-Knopp
        assignments (or the EMA teacher's), and the losses of the full image against them.

        Returns targets [B,r,C], cls_targets [B,C], sparse_tgt [B,r,D] (detached), clustering,
        cls_clustering and koleo (scalars).
        """
        ccfg, lcfg = self.cfg["clustering"], self.cfg["loss"]
        sk = dict(temperature=ccfg["sk_temperature"], iterations=ccfg["sk_iterations"])
        ce_t = ccfg["ce_temperature"]
        B, r = sparse.shape[:2]
        head, cls_head = self.clustering_head, self.cls_head
        koleo = koleo_loss(sparse)
        if not self._fused_ce(sparse):                       # the public structure: [M, C] logits
            logits = head(sparse)                                                      # B x r x C
            cls_logits = cls_head(cls[:, 0])                                           # B x C
            C = logits.shape[-1]
            if self.teacher is None:
                targets = sinkhorn_knopp(logits.detach().flatten(0, 1), **sk).view(B, r, C)
                cls_targets = sinkhorn_knopp(cls_logits.detach(), **sk)               # B x C
                sparse_tgt = sparse.detach()
                clustering = soft_cross_entropy(logits, targets, ce_t)
            else:
                targets, cls_targets, sparse_tgt = self._teacher_targets(image, views, **sk)
                match = match_tokens(sparse, sparse_tgt, lcfg["ot_epsilon"], lcfg["ot_iterations"])
                clustering = soft_cross_entropy(logits, _gather_rows(targets, match), ce_t)
            cls_clustering = soft_cross_entropy(cls_logits, cls_targets, ce_t)
        else:                                                # fused: the logits only for Sinkhorn-Knopp
            z = head.features(sparse).flatten(0, 1)                                    # B*r x K
            cls_z = cls_head.features(cls[:, 0])                                       # B x K
            index = None
            if self.teacher is None:
                with torch.no_grad():
                    flat_targets = sinkhorn_knopp(head.logits(z.detach()), **sk)       # B*r x C
                    cls_targets = sinkhorn_knopp(cls_head.logits(cls_z.detach()), **sk)
                targets = flat_targets.view(B, r, -1)
                sparse_tgt = sparse.detach()
            else:
                targets, cls_targets, sparse_tgt = self._teacher_targets(image, views, **sk)
                match = match_tokens(sparse, sparse_tgt, lcfg["ot_epsilon"], lcfg["ot_iterations"])
                index = (_rows(B, 1, sparse.device) * r).unsqueeze(1) + match          # B x r rows of targets
                index = index.flatten()
            clustering = self._clustering_ce(head, z, targets.flatten(0, 1), index)
            cls_clustering = self._clustering_ce(cls_head, cls_z, cls_targets, None)
        return {"targets": targets, "cls_targets": cls_targets, "sparse_tgt": sparse_tgt,
                "clustering": clustering, "cls_clustering": cls_clustering, "koleo": koleo}

    def masked_view_losses(self, cls_m: Tensor, sparse_m: Tensor, sparse_tgt: Tensor, targets: Tensor,
                           cls_targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The masked views (cls_m [B*G,1,D], sparse_m [B*G,r,D], view-major per image) against the
        full image's targets (targets [B,r,C], cls_targets [B,C], sparse_tgt [B,r,D]).
        Returns (mask_loss, their CLS loss, their KoLeo)."""
        lcfg, ce_t = self.cfg["loss"], self.cfg["clustering"]["ce_temperature"]
        B, r = targets.shape[:2]
        G = sparse_m.shape[0] // B
        koleo = koleo_loss(sparse_m)
        tgt = sparse_tgt.repeat_interleave(G, dim=0)                                   # B*G x r x D
        match = match_tokens(sparse_m, tgt, lcfg["ot_epsilon"], lcfg["ot_iterations"])  # B*G x r
        if not self._fused_ce(sparse_m):                     # the public structure
            view_targets = _gather_rows(targets.repeat_interleave(G, dim=0), match)    # B*G x r x C
            mask_loss = soft_cross_entropy(self.clustering_head(sparse_m), view_targets, ce_t)
            cls_loss = soft_cross_entropy(self.cls_head(cls_m[:, 0]), cls_targets.repeat_interleave(G, 0), ce_t)
        else:                                                # rows index the full image's targets
            image_of_view = _rows(B, G, sparse_m.device)                               # B*G
            index = ((image_of_view * r).unsqueeze(1) + match).flatten()               # B*G*r rows of targets
            z = self.clustering_head.features(sparse_m).flatten(0, 1)                  # B*G*r x K
            mask_loss = self._clustering_ce(self.clustering_head, z, targets.flatten(0, 1), index)
            cls_loss = self._clustering_ce(self.cls_head, self.cls_head.features(cls_m[:, 0]), cls_targets,
                                           image_of_view)
        return mask_loss, cls_loss, koleo

    def local_view_losses(self, cls_l: Tensor, cls_targets: Tensor) -> Tensor:
        """The local views' CLS (cls_l [B*Lc,1,D], view-major per image) against cls_targets [B,C]."""
        ce_t = self.cfg["clustering"]["ce_temperature"]
        B = cls_targets.shape[0]
        Lc = cls_l.shape[0] // B
        if not self._fused_ce(cls_l):
            return soft_cross_entropy(self.cls_head(cls_l[:, 0]), cls_targets.repeat_interleave(Lc, 0), ce_t)
        return self._clustering_ce(self.cls_head, self.cls_head.features(cls_l[:, 0]), cls_targets,
                                   _rows(B, Lc, cls_l.device))

    def _fused_ce(self, x: Tensor) -> bool:
        """Whether the clustering losses go through the prototype CE op: ``clustering.fused`` true,
        or auto on CUDA with the pieces eager (on the CPU the op would only be its [M, C]
        reference; compiled, inductor's fusion of the plain loss is faster: module docstring)."""
        if self._prototype_ce is None:
            return False
        return self.cfg["clustering"]["fused"] is True or (x.is_cuda and not self._compiled)

    def _clustering_ce(self, head: ClusteringHead, z: Tensor, targets: Tensor, index: Tensor | None) -> Tensor:
        """Soft CE of head.logits(z) [M, C] against targets[index] ([T, C]), without the logits in memory."""
        return self._prototype_ce(z, head.prototypes.weight, targets, self.cfg["clustering"]["ce_temperature"],
                                  target_index=index)

    def compile_pieces(self, **compile_kwargs) -> "Stellar":
        """torch.compile the step's pieces in place, static shapes by default (``dynamic=False``):
        each ViT block of the encoder and decoder (one graph per distinct input shape: one for a
        packed pass, one per view group otherwise, shared by all blocks of a ViT), each view
        group's embedding, and ``image_targets`` / ``masked_view_losses`` / ``local_view_losses``.
        Parameter names and the state dict are unchanged. ``compile_kwargs`` go to torch.compile
        (backend, mode, ...)."""
        compile_kwargs.setdefault("dynamic", False)
        towers = [self.encoder.vit.transformer, self.decoder.transformer]
        if self.teacher is not None:
            towers.append(self.teacher["encoder"].vit.transformer)
        for tower in towers:
            for block in tower.blocks:
                block.compile(**compile_kwargs)
        self.encoder.compile_embedding(**compile_kwargs)
        self._compiled = {name: torch.compile(getattr(self, name), **compile_kwargs) for name in COMPILED_PIECES}
        return self

    def _piece(self, name: str):
        return self._compiled.get(name) or getattr(self, name)

    def _keep_indices(self, keep: Tensor | None, B: int, G: int, gh: int, gw: int,
                      device: torch.device) -> Tensor:
        """The masked views' kept patches, LongTensor[B*G, n_keep]: batch['keep'] checked, or drawn."""
        mc = self.cfg["masking"]
        n_keep = num_keep(gh * gw, mc["mask_ratio"])
        if keep is None:
            return sample_keep_indices(B * G, gh, gw, mc["mask_ratio"], mc["focal"], mc["focal_prob"],
                                       device=device)
        if (not isinstance(keep, Tensor) or keep.dtype != torch.int64
                or tuple(keep.shape) != (B, G, n_keep)):
            got = (keep.dtype, tuple(keep.shape)) if isinstance(keep, Tensor) else type(keep).__name__
            raise ValueError(f"batch['keep'] must be a LongTensor[B={B}, G={G}, n_keep={n_keep}] of patch "
                             f"indices (n_keep = int(N * (1 - mask_ratio)) for a {gh}x{gw} grid at "
                             f"model.masking.mask_ratio={mc['mask_ratio']}), got {got}")
        if keep.device.type == "cpu" and keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= gh * gw):
            # (checked where it costs no device synchronisation: loaders hand the indices over on the CPU)
            raise ValueError(f"batch['keep'] holds patch indices outside [0, {gh * gw}), "
                             f"got [{int(keep.min())}, {int(keep.max())}]")
        return keep.flatten(0, 1).to(device, non_blocking=True)

    def _recon_loss(self, out: Tensor, image: Tensor, grid: tuple[int, int]) -> Tensor:
        if self.decoder.head_kind == "pixels":
            return pixel_loss(out, image)
        if self.tokenizer is None:
            raise RuntimeError("the token head needs a tokenizer: pass tokenizer= or set "
                               "model.decoder.tokenizer to the MaskGIT-VQGAN weights file")
        factor = getattr(self.tokenizer, "downsample_factor", 16)
        size = (grid[0] * factor, grid[1] * factor)
        with torch.no_grad():
            x = image.float()
            if tuple(x.shape[-2:]) != size:
                # /14 models: 224 px -> 256 px bicubic so the f16 tokenizer gives N codes.
                x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
            codes = self.tokenizer(x)
        return token_loss(out, codes)

    # ------------------------------------------------------------------ EMA teacher
    @torch.no_grad()
    def update_teacher(self) -> None:
        """teacher <- m * teacher + (1 - m) * student, over encoder and both clustering heads.

        Call it after each optimizer step (the trainer does); ``forward`` never changes the teacher."""
        if self.teacher is None:
            return
        m = self.cfg["ema"]["momentum"]
        pairs = (("encoder", self.encoder), ("clustering_head", self.clustering_head), ("cls_head", self.cls_head))
        for name, student in pairs:
            t_params = list(self.teacher[name].parameters())
            s_params = [p.detach() for p in student.parameters()]
            torch._foreach_lerp_(t_params, s_params, 1.0 - m)

    @torch.no_grad()
    def _teacher_targets(self, image: Tensor, views: Tensor | None, temperature: float,
                         iterations: int) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher targets from the second global view (the first, or `image`, when fewer exist)."""
        if views is None or views.shape[1] == 0:
            x = image
        else:
            x = views[:, min(1, views.shape[1] - 1)]
        t = self.teacher
        cls_t, _, sparse_t = t["encoder"](x)
        logits = t["clustering_head"](sparse_t)                                        # B x r x C
        B, r, C = logits.shape
        targets = sinkhorn_knopp(logits.flatten(0, 1), temperature, iterations).view(B, r, C)
        cls_targets = sinkhorn_knopp(t["cls_head"](cls_t[:, 0]), temperature, iterations)
        return targets, cls_targets, sparse_t


def _rows(B: int, per: int, device: torch.device) -> Tensor:
    """LongTensor[B*per]: the image of each row when each of B images has ``per`` consecutive rows."""
    return torch.arange(B * per, device=device) // per


def _prototype_ce_fn(fused):
    """The prototype cross-entropy behind ``model.clustering.fused``: None for ``false`` (the public
    structure), else stellar.kernels.prototype_cross_entropy (its Triton kernels on CUDA, its
    reference elsewhere; on CUDA without Triton it warns and runs the reference)."""
    if fused is False:
        return None
    from stellar.kernels import prototype_cross_entropy

    return prototype_cross_entropy


def _gather_rows(targets: Tensor, index: Tensor) -> Tensor:
    """targets Tensor[B, r, C], index LongTensor[B, r] -> Tensor[B, r, C], row i = targets[b, index[b, i]]."""
    return torch.gather(targets, 1, index.unsqueeze(-1).expand(-1, -1, targets.shape[-1]))


def _check_images(name: str, x: Any, dims: int, batch: int | None = None) -> Tensor:
    shape = "[B, 3, H, W]" if dims == 4 else "[B, V, 3, H, W]"
    if not isinstance(x, Tensor) or x.dim() != dims or x.shape[-3] != 3 or not x.is_floating_point():
        got = (x.dtype, tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating Tensor{shape}, got {got}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name} must hold B={batch} images, got {x.shape[0]}")
    return x

"""The online-clustering head (STELLAR.md section 4): MLP, L2-normalize, prototypes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClusteringHead", "indexed_prototype_cross_entropy"]


class ClusteringHead(nn.Module):
    """MLP D -> hidden -> bottleneck (GELU), L2-normalize (eps 1e-7), prototypes (no bias).

    ``mlp`` is ``Sequential(Linear, GELU, Linear)`` (the checkpoint's ``predictor.layers.{0,2}``),
    ``prototypes`` a ``Linear(bottleneck, C, bias=False)`` initialised normal std 1 (the
    checkpoint's ``layer``). forward(x: Tensor[..., D]) -> logits Tensor[..., C] in float32
    (float64 for a float64 model) = ``logits(features(x))``.
    """

    def __init__(self, dim: int, hidden: int = 2048, bottleneck: int = 256, prototypes: int = 16384) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Linear(bottleneck, prototypes, bias=False)
        nn.init.normal_(self.prototypes.weight, std=1.0)

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.out_features

    def features(self, x: Tensor) -> Tensor:
        """x: Tensor[..., D] -> the L2-normalised bottleneck features Tensor[..., bottleneck], the
        input of the prototype layer (what a fused prototype cross-entropy takes, with
        ``prototypes.weight``, instead of the [..., C] logits)."""
        return F.normalize(self.mlp(x), dim=-1, eps=1e-7)

    def logits(self, z: Tensor) -> Tensor:
        """z: normalised features Tensor[..., bottleneck] -> logits Tensor[..., C], float32 (or float64)."""
        logits = self.prototypes(z)
        return logits if logits.dtype == torch.float64 else logits.float()

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(self.features(x))


def indexed_prototype_cross_entropy(features: Tensor, prototypes: Tensor, targets: Tensor,
                                    temperature: float = 0.12, target_index: Tensor | None = None) -> Tensor:
    """Soft CE of ``features @ prototypes^T`` against ``targets[target_index]``, in plain PyTorch,
    without any repeated or gathered [M, C] copy of the targets.

        CE_m = sum_c t_c * (lse_m - l_mc) = lse_m * sum_c t_c - (t @ W)_m . z_m / T
    with l = z W^T / T, t = targets[idx(m)]: the target term needs only ``targets @ W`` ([T, K],
    K the bottleneck width) indexed per row. The logits [M, C] are still formed once for the
    log-sum-exp (the fused kernel of stellar.kernels avoids that too). A plain form independent
    of that op and of its reference: tests/test_model.py checks the model's wiring with it.

    features Tensor[M, K] (normalised), prototypes Tensor[C, K], targets Tensor[T, C] (no
    gradient), target_index LongTensor[M] in [0, T) or None (T == M). Returns the mean over rows,
    float32 (float64 for float64 features).
    """
    if target_index is None and targets.shape[0] != features.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} rows for {features.shape[0]} features: pass target_index")
    logits = F.linear(features, prototypes)                                   # M x C (autocast dtype)
    acc = torch.promote_types(logits.dtype, torch.float32)
    with torch.autocast(device_type=features.device.type, enabled=False):
        lse = torch.logsumexp(logits.to(acc) / temperature, dim=-1)           # M
        t = targets.detach().to(acc)
        tw = t @ prototypes.to(acc)                                           # T x K
        tsum = t.sum(dim=-1)                                                  # T
        if target_index is not None:
            tw, tsum = tw[target_index], tsum[target_index]
        dot = (tw * features.to(acc)).sum(dim=-1) / temperature               # M
        return (lse * tsum - dot).mean()

"""The online-clustering head (STELLAR.md section 4): MLP, L2-normalize, prototypes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClusteringHead"]


class ClusteringHead(nn.Module):
    """MLP D -> hidden -> bottleneck (GELU), L2-normalize (eps 1e-7), prototypes (no bias).

    ``mlp`` is ``Sequential(Linear, GELU, Linear)`` (the checkpoint's ``predictor.layers.{0,2}``),
    ``prototypes`` a ``Linear(bottleneck, C, bias=False)`` initialised normal std 1 (the
    checkpoint's ``layer``). forward(x: Tensor[..., D]) -> logits Tensor[..., C] in float32
    (float64 for a float64 model).
    """

    def __init__(self, dim: int, hidden: int = 2048, bottleneck: int = 256, prototypes: int = 16384) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Linear(bottleneck, prototypes, bias=False)
        nn.init.normal_(self.prototypes.weight, std=1.0)

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.out_features

    def forward(self, x: Tensor) -> Tensor:
        z = F.normalize(self.mlp(x), dim=-1, eps=1e-7)
        logits = self.prototypes(z)
        return logits if logits.dtype == torch.float64 else logits.float()

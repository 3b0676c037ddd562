"""SpatialSemanticFactorization: the drop-in module around `stellar.kernels.factorize`.

    q = normalize(dense_proj(dense))       [B, N, D]
    k = normalize(sparse_proj(sparse))     [B, r, D]
    L = softmax_r(q k^T / temperature)     [B, N, r]   where each concept sits
    Z = L @ values                         [B, N, Dv]  values default to the raw tokens S
"""
from __future__ import annotations

from torch import Tensor, nn

from stellar.kernels import factorize


class SpatialSemanticFactorization(nn.Module):
    """Factorize dense patch features onto r sparse concept tokens (STELLAR.md section 2).

    Args:
        dim: D, the width of `dense` and `sparse`.
        temperature: the spatial softmax temperature tau_s.
        value_dim: Dv, the width of the values mixed into Z (default `dim`: the raw tokens).
            With a different width pass `values=` to `forward`.
        eps: floor on the L2 norms.
        backend: "auto", "triton" or "torch" (see `stellar.kernels.factorize`).

    Parameters `dense_proj` and `sparse_proj` (`nn.Linear(dim, dim)`) carry the checkpoint names.
    """

    def __init__(self, dim: int, temperature: float = 0.06, value_dim: int | None = None,
                 eps: float = 1e-7, backend: str = "auto"):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.dim = dim
        self.value_dim = dim if value_dim is None else value_dim
        self.temperature = temperature
        self.eps = eps
        self.backend = backend
        self.dense_proj = nn.Linear(dim, dim)
        self.sparse_proj = nn.Linear(dim, dim)

    def forward(
        self,
        dense: Tensor,
        sparse: Tensor,
        return_L: bool = True,
        out_proj: nn.Linear | None = None,
        values: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """
        Args:
            dense: Tensor[B, N, D], the patch features.
            sparse: Tensor[B, r, D], the sparse tokens S.
            return_L: also return the localization matrix L.
            out_proj: an `nn.Linear(Dv, Do)` applied to Z without forming Z (computed as
                L @ (values @ W^T) + b, at rank r): the decoder's input projection.
            values: Tensor[B, r, Dv], the values to mix (default: `sparse`).

        Returns:
            Z: Tensor[B, N, Dv] (or [B, N, Do] with out_proj), L: Tensor[B, N, r] or None.
        """
        values = sparse if values is None else values
        if values.shape[-1] != self.value_dim:
            raise ValueError(f"values must have width value_dim={self.value_dim}, got {values.shape[-1]}")
        return factorize(
            self.dense_proj(dense), self.sparse_proj(sparse), values,
            temperature=self.temperature, eps=self.eps, return_L=return_L,
            backend=self.backend, out_proj=out_proj,
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, value_dim={self.value_dim}, temperature={self.temperature}, backend={self.backend!r}"

"""stellar.kernels: the factorization op and the prototype cross-entropy (fused Triton kernels,
each with a plain PyTorch twin).

    factorize(dense[B,N,D], sparse_q[B,r,D], sparse_v[B,r,Dv], temperature=0.06, eps=1e-7,
              return_L=True, backend="auto", out_proj=None) -> (Z[B,N,Dv], L[B,N,r] | None)

    prototype_cross_entropy(features[M,K], prototypes[C,K], targets[T,C], temperature=0.12,
                            target_index=None, backend="auto") -> loss (float32 scalar)

`reference.factorize` and `reference.prototype_cross_entropy` are the plain PyTorch twins;
`backend_info()` says which path "auto" takes.
"""
from . import reference
from .factorization import backend_info, factorize
from .prototype_ce import prototype_cross_entropy
from .reference import factorize as factorize_reference

__all__ = ["backend_info", "factorize", "factorize_reference", "prototype_cross_entropy", "reference"]

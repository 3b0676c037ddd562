"""stellar.kernels: the factorization op (fused Triton kernels with a plain PyTorch twin).

    factorize(dense[B,N,D], sparse_q[B,r,D], sparse_v[B,r,Dv], temperature=0.06, eps=1e-7,
              return_L=True, backend="auto", out_proj=None) -> (Z[B,N,Dv], L[B,N,r] | None)

`reference.factorize` is the plain PyTorch twin; `backend_info()` says which path "auto" takes.
"""
from . import reference
from .factorization import backend_info, factorize
from .reference import factorize as factorize_reference

__all__ = ["backend_info", "factorize", "factorize_reference", "reference"]

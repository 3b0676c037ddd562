"""stellar.kernels: the factorization op (fused Triton kernels with a plain PyTorch twin)."""
from . import reference
from .reference import factorize as factorize_reference


def factorize(dense, sparse_q, sparse_v, temperature=0.06, eps=1e-7, return_L=True, backend="auto"):
    """Placeholder dispatch until the Triton kernels land: the reference path."""
    Z, L = factorize_reference(dense, sparse_q, sparse_v, temperature, eps)
    return Z, (L if return_L else None)


__all__ = ["factorize", "factorize_reference", "reference"]

"""stellar.kernels: the factorization op and the prototype cross-entropy (fused Triton kernels,
each with a plain PyTorch twin).

    factorize(dense[B,N,D], sparse_q[B,r,D], sparse_v[B,r,Dv], temperature=0.06, eps=1e-7,
              return_L=True, backend="auto", out_proj=None) -> (Z[B,N,Dv], L[B,N,r] | None)

    prototype_cross_entropy(features[M,K], prototypes[C,K], targets[T,C], temperature=0.12,
                            target_index=None, backend="auto") -> loss (float32 scalar)

`reference.factorize` and `reference.prototype_cross_entropy` are the plain PyTorch twins;
`backend_info()` says which path "auto" takes.
"""
if __name__ == "stellar.kernels":
    from . import reference
    from .factorization import backend_info, factorize
    from .prototype_ce import prototype_cross_entropy
    from .reference import factorize as factorize_reference

    __all__ = ["backend_info", "factorize", "factorize_reference", "prototype_cross_entropy", "reference"]
else:
    # This folder is the source of `stellar.kernels`. Found as a top-level `kernels` (Python run
    # from the repository root puts it on sys.path), it must stay inert: `import transformers`
    # imports a top-level `kernels` (the Hub kernels package) to read its version, and a second
    # copy of our modules would register the `stellar::` custom ops again, from other module
    # objects. So it defines nothing and says where the real package is.
    __all__: list = []

    def __getattr__(name: str):
        raise AttributeError(f"{__file__} is the source folder of stellar.kernels, imported here as a top-level "
                             f"`kernels` (run from the repository root?): use `stellar.kernels.{name}`")

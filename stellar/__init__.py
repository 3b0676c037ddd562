"""stellar: a fast, complete implementation of STELLAR (sparse concept tokens x localization).

`import stellar` makes the ops `torch.ops.stellar.*` available, as `import torchvision` does for
its own: the factorization's custom ops (`factorize_fwd`, `factorize_bwd`) and, where stellar._C
was built for the running torch, `multicrop` with its fake implementation. It does so without
importing torch itself (the CLI starts fast): at once when torch is already imported, else right
after `import torch` finishes. A missing or stale extension is not an error at import; it is
raised, with how to rebuild, when the op is used through `stellar.ops.multicrop` or
`stellar._ext.load()`.
"""
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


def _register_ops() -> None:
    from stellar import kernels  # noqa: F401  registers stellar::factorize_fwd / factorize_bwd
    from stellar import ops

    ops.load_if_built()


class _AfterTorchImport(importlib.abc.MetaPathFinder):
    """Calls _register_ops once `import torch` has finished (only when stellar came first)."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_torch = spec.loader.exec_module

        def exec_module(module):
            exec_torch(module)
            try:
                _register_ops()
            except Exception as exc:  # never break `import torch`; say why the ops are missing
                import warnings

                warnings.warn(f"stellar: torch.ops.stellar.* not registered ({type(exc).__name__}: {exc}); "
                              "import stellar.kernels / stellar.ops to see the error", RuntimeWarning, stacklevel=2)

        spec.loader.exec_module = exec_module
        return spec


if "torch" in sys.modules:
    _register_ops()
elif not any(isinstance(f, _AfterTorchImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTorchImport())

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
import sys

__version__ = "0.1.0"


def _register_ops() -> None:
    from stellar import kernels  # noqa: F401  registers stellar::factorize_fwd / factorize_bwd
    from stellar import ops

    ops.load_if_built()


# The modules _register_ops() runs; when `import torch` executes torch from inside one of them
# (`import stellar._ext` first), the registration waits for that module's last line.
_REGISTRATION_MODULES = ("stellar.ops", "stellar._ext")
_deferred = False


def _initializing(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False)


def _register_when_whole(name: str) -> None:
    """Called on the last line of each module in _REGISTRATION_MODULES: the registration a torch
    import inside them deferred, now that `name` is whole."""
    if _deferred:
        _register_after_torch(whole=name)


def _register_after_torch(whole: str = "") -> None:
    """_register_ops() once torch has been imported; a failure warns, never breaks `import torch`."""
    global _deferred
    _deferred = any(_initializing(n) for n in _REGISTRATION_MODULES if n != whole)
    if _deferred:
        return
    try:
        _register_ops()
    except Exception as exc:
        message = (f"stellar: torch.ops.stellar.* not registered ({type(exc).__name__}: {exc}); "
                   "import stellar.kernels / stellar.ops to see the error")
        import warnings

        try:
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        except Exception:  # warnings turned into errors (-W error): torch's import must still succeed
            print(f"RuntimeWarning: {message}", file=sys.stderr)


class _AfterTorchImport(importlib.abc.MetaPathFinder):
    """Registers the ops once `import torch` has executed torch (only when stellar came first).

    Any other name costs one comparison. For "torch" it takes the spec from the finders after it
    and wraps that spec's loader, so the registration follows the execution of torch itself: a
    probe that executes nothing (`importlib.util.find_spec("torch")`, as libraries check whether
    torch is installed) leaves the hook armed. It leaves `sys.meta_path` once torch has run.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "torch" or self not in sys.meta_path:
            return None
        spec = None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        loader = getattr(spec, "loader", None)
        run = getattr(loader, "exec_module", None)
        if run is None or getattr(run, "_stellar_hook", False):
            return spec

        def exec_module(module):
            run(module)
            if module.__name__ != "torch":      # a loader object that other modules share
                return
            try:
                sys.meta_path.remove(self)
            except ValueError:                  # torch executed twice (a reload): registered already
                return
            _register_after_torch()

        exec_module._stellar_hook = True
        loader.exec_module = exec_module
        return spec


if "torch" in sys.modules:
    _register_ops()
elif not any(isinstance(f, _AfterTorchImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTorchImport())

"""Loading the C++/CUDA extension `stellar._C` (built from csrc/ by setup.py).

`load()` imports it once (which registers `torch.ops.stellar.*`) and raises a clear error when
it is missing or was built for another torch ("built for torch X, running Y");
`extension_info()` says what was built, for `stellar info`, without raising.
"""
import glob
import importlib
import os
import re
from typing import Optional

import torch

_REBUILD = "rebuild it with `pip install --no-build-isolation --no-deps -e .` (or `make setup`)"
_MARKER = re.compile(rb"STELLAR_BUILT_FOR_TORCH=([^;\x00]*);")
_module = None


class ExtensionError(RuntimeError):
    """stellar._C is missing, unloadable, or built for another torch."""


def _library_path() -> Optional[str]:
    """The stellar._C shared object next to this file, if one was built."""
    found = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C.*")))
    found = [p for p in found if p.endswith((".so", ".pyd"))]
    return found[0] if found else None


def _built_for(path: str) -> Optional[str]:
    """The torch version written into the shared object at build time (read, not loaded)."""
    with open(path, "rb") as f:
        match = _MARKER.search(f.read())
    return match.group(1).decode() if match else None


def load():
    """Import stellar._C (registers torch.ops.stellar.multicrop); return the module.

    Raises ExtensionError when it was not built, was built for another torch version, or fails
    to load.
    """
    global _module
    if _module is not None:
        return _module
    path = _library_path()
    if path is None:
        raise ExtensionError(f"stellar._C is not built (no stellar/_C*.so): {_REBUILD}")
    built_for = _built_for(path)
    running = torch.__version__
    if built_for is not None and built_for != running:
        raise ExtensionError(
            f"stellar._C was built for torch {built_for}, running {running}: {_REBUILD}"
        )
    try:
        module = importlib.import_module("stellar._C")
    except ImportError as e:
        raise ExtensionError(
            f"stellar._C (built for torch {built_for or 'unknown'}, running {running}) failed to "
            f"load: {e}; {_REBUILD}"
        ) from e
    if _has_private_cxx_runtime(path):
        raise ExtensionError(
            f"stellar._C ({path}) carries its own copy of the C++ runtime (libstdc++ was linked "
            "statically: its __cxa_throw is not libstdc++.so.6's), so any error the op raises "
            "would crash the process with SIGSEGV instead of a RuntimeError; rebuild it with a "
            f"compiler that links the shared libstdc++ (e.g. CXX=/usr/bin/g++ CC=/usr/bin/gcc): {_REBUILD}"
        )
    _module = module
    return module


def _has_private_cxx_runtime(path: str) -> bool:
    """True when the loaded shared object resolves __cxa_throw to a copy of its own rather than
    libstdc++.so.6's (a statically linked libstdc++; C++ exceptions crossing it then segfault).
    False when that cannot be told (no libstdc++.so.6 in the process, e.g. another C++ runtime)."""
    import ctypes

    try:
        ours = ctypes.CDLL(path)["__cxa_throw"]
        shared = ctypes.CDLL("libstdc++.so.6")["__cxa_throw"]
    except (OSError, AttributeError):
        return False
    return ctypes.cast(ours, ctypes.c_void_p).value != ctypes.cast(shared, ctypes.c_void_p).value


def is_available() -> bool:
    """True when stellar._C loads (and so torch.ops.stellar.multicrop exists)."""
    try:
        load()
    except ExtensionError:
        return False
    return True


def extension_info() -> dict:
    """What was built, for `stellar info`; never raises.

    Returns {"built": bool, "cuda": bool, "cuda_version": str | None, "arch_list": list[str],
    "torch_built": str | None, "torch_running": str, "path": str | None, "error": str | None}.
    """
    path = _library_path()
    info = {
        "built": path is not None,
        "cuda": False,
        "cuda_version": None,
        "arch_list": [],
        "torch_built": _built_for(path) if path else None,
        "torch_running": torch.__version__,
        "path": path,
        "error": None,
    }
    try:
        module = load()
    except ExtensionError as e:
        info["error"] = str(e)
        return info
    info["cuda"] = bool(module.WITH_CUDA)
    info["cuda_version"] = module.CUDA_VERSION or None
    info["arch_list"] = [a for a in re.split(r"[;\s]+", module.CUDA_ARCH_LIST) if a]
    info["torch_built"] = module.TORCH_VERSION
    return info


# Last line: `import stellar._ext` before torch ran torch's import hook (stellar/__init__.py) above;
# the ops it registers need this module whole.
__import__("stellar")._register_when_whole(__name__)

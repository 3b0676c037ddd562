"""What setup.py built: stellar._C loads, names its torch, and holds compiled CUDA code wherever a
CUDA toolchain was there to compile it (the proof, on CPU-only CI, that the .cu sources build).
"""
import os
import re
import shutil

import pytest
import torch

from stellar import _ext

if os.environ.get("STELLAR_SKIP_EXT") == "1":
    pytest.skip("STELLAR_SKIP_EXT=1: stellar._C not built", allow_module_level=True)


def _cuda_toolchain() -> bool:
    """The same test as setup.py: a toolkit with nvcc and cuda_runtime.h, and a CUDA torch."""
    if os.environ.get("STELLAR_SKIP_CUDA") == "1" or torch.version.cuda is None:
        return False
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    return any(
        h and os.path.isfile(os.path.join(h, "bin", "nvcc"))
        and os.path.isfile(os.path.join(h, "include", "cuda_runtime.h"))
        for h in homes
    )


def test_extension_loads_and_names_its_torch():
    info = _ext.extension_info()
    assert info["built"] and info["error"] is None, info
    assert info["torch_built"] == torch.__version__
    assert torch._C._dispatch_has_kernel_for_dispatch_key("stellar::multicrop", "CPU")


@pytest.mark.skipif(not _cuda_toolchain(), reason="no CUDA toolchain here: a CPU-only build is right")
def test_cuda_sources_were_compiled():
    info = _ext.extension_info()
    assert info["cuda"], "a CUDA toolchain is present but stellar._C was built CPU-only"
    assert info["arch_list"] and info["cuda_version"] == torch.version.cuda
    assert torch._C._dispatch_has_kernel_for_dispatch_key("stellar::multicrop", "CUDA")
    with open(info["path"], "rb") as f:
        blob = f.read()
    # the device code nvcc embeds (a fat binary) and the kernels' mangled names
    assert b".nv_fatbin" in blob
    assert b"color_kernel" in blob and b"blur_kernel" in blob


def test_version_mismatch_says_built_for_and_running(monkeypatch):
    built = _ext.extension_info()["torch_built"]
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(torch, "__version__", "0.0.1+other")
    with pytest.raises(_ext.ExtensionError, match=re.escape(f"built for torch {built}, running 0.0.1+other")):
        _ext.load()
    info = _ext.extension_info()
    assert info["built"] and "running 0.0.1+other" in info["error"]


def test_missing_extension_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_library_path", lambda: None)
    with pytest.raises(_ext.ExtensionError, match="stellar._C is not built"):
        _ext.load()
    assert not _ext.is_available()
    assert _ext.extension_info()["built"] is False


def test_cuda_tensors_always_reach_a_cuda_kernel():
    """A CUDA build registers the CUDA body; a CPU-only build registers one that refuses CUDA
    tensors with how to rebuild (not the dispatcher's 'could not run ... CUDA backend')."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("stellar::multicrop", "CUDA")


@pytest.mark.parametrize("order", ["import stellar; import torch", "import torch; import stellar"])
def test_import_stellar_makes_torch_ops_stellar_available(order):
    """In a fresh interpreter, `import stellar` (before or after torch) registers every
    torch.ops.stellar op, and does not itself import torch."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import stellar\n"
        f"assert ('torch' in sys.modules) == {order.startswith('import torch')}, 'import stellar imported torch'\n"
        f"{order.split(';')[-1].strip() if order.startswith('import stellar') else ''}\n"
        "import torch\n"
        "for name in ('multicrop', 'factorize_fwd', 'factorize_bwd'):\n"
        "    getattr(torch.ops.stellar, name)\n"
        "print('ok')\n"
    )
    if order.startswith("import torch"):
        code = "import torch\n" + code
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr


@pytest.mark.parametrize("first", ["stellar._ext", "stellar.ops", "stellar.kernels"])
def test_a_submodule_imported_first_registers_every_op_without_a_warning(first):
    """`import stellar._ext` first (as gpu_multicrop.sh does) runs torch from inside that module:
    the registration the import hook then makes must find it whole (it warned 'partially
    initialized module' and left torch.ops.stellar.* unregistered)."""
    import subprocess
    import sys

    code = (f"import {first}\nimport torch\n"
            "for name in ('multicrop', 'factorize_fwd', 'factorize_bwd', 'prototype_ce_fwd'):\n"
            "    getattr(torch.ops.stellar, name)\nprint('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
    assert "not registered" not in run.stderr, run.stderr


def test_the_import_hook_survives_a_probe_and_never_breaks_torch():
    """`importlib.util.find_spec("torch")` before `import torch` (how libraries check that torch is
    installed) leaves the hook armed: the ops are still registered when torch is imported. A
    registration that fails, with warnings as errors, still lets torch import and says why."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = ("import importlib.util, stellar\n"
             "assert importlib.util.find_spec('torch') is not None\n"
             "import torch\n"
             "torch.ops.stellar.factorize_fwd\n"
             "print('ok')\n")
    failing = ("import sys, stellar\n"
               "def boom():\n"
               "    raise RuntimeError('simulated')\n"
               "stellar._register_ops = boom\n"
               "import torch\n"
               "assert 'torch' in sys.modules and torch.ones(1).item() == 1.0\n"
               "print('ok')\n")
    for code, flags in ((probe, []), (failing, ["-W", "error"])):
        run = subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=300,
                             env=env)
        assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
    assert "not registered (RuntimeError: simulated)" in run.stderr, run.stderr


def test_the_kernels_folder_is_inert_as_a_top_level_package():
    """Run from the repository root, `import kernels` finds our kernels/ source folder (transformers
    does that import to read the Hub kernels package's version). It must define and register
    nothing, so stellar.kernels keeps the only copy of the custom ops; before the guard, the
    second copy re-registered stellar::prototype_ce_fwd from other module objects and broke
    every later prototype-CE call of the process."""
    import pathlib
    import subprocess
    import sys

    code = (
        "import sys, kernels\n"
        "assert kernels.__all__ == [] and not hasattr(kernels, 'factorize'), dir(kernels)\n"
        "import stellar.kernels as sk\n"
        "assert [m for m in sys.modules if m.startswith('kernels.')] == [], sorted(sys.modules)\n"
        "assert sk.prototype_cross_entropy.__module__ == 'stellar.kernels.prototype_ce'\n"
        "try:\n"
        "    kernels.factorize\n"
        "except AttributeError as e:\n"
        "    assert 'stellar.kernels.factorize' in str(e), e\n"
        "print('ok')\n"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr

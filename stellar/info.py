"""What this installation has: versions, devices, and which fast paths are live.

    python -m stellar.info        (or: stellar info)

Each optional piece is probed on its own; one that is missing or broken is reported as such.
"""
from __future__ import annotations

import importlib
import os
import platform
import sys


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # a missing or broken optional package is a fact to report
        return f"not available ({type(exc).__name__}: {exc})".splitlines()[0]


def _probe(what: str, fn_path: str) -> dict:
    """Call ``module:function`` and return its dict, or the reason it could not be called."""
    module, _, name = fn_path.partition(":")
    try:
        result = getattr(importlib.import_module(module), name)()
        return dict(result) if isinstance(result, dict) else {"info": result}
    except Exception as exc:
        return {"available": False, "error": f"{what}: {type(exc).__name__}: {exc}".splitlines()[0]}


def devices() -> dict:
    import torch

    info = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["cuda_version"] = torch.version.cuda
        info["gpus"] = [f"{i}: {torch.cuda.get_device_name(i)} "
                        f"({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
                        for i in range(torch.cuda.device_count())]
    return info


def collect_info() -> dict:
    """Versions, devices, the Triton kernels' backend info and the C++/CUDA extension's info."""
    import stellar

    return {
        "versions": {
            "stellar": stellar.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "torch": _version("torch"),
            "torchvision": _version("torchvision"),
            "triton": _version("triton"),
            "numpy": _version("numpy"),
            "safetensors": _version("safetensors"),
            "dali": _version("nvidia.dali"),
            "torchao": _version("torchao"),
            "xformers": _version("xformers"),
        },
        "devices": devices(),
        "kernels": _probe("stellar.kernels", "stellar.kernels:backend_info"),
        "extension": _probe("stellar._ext", "stellar._ext:extension_info"),
        "attention": _probe("packed attention (model.attention)", "stellar.nn.vit:attention_info"),
        "data": _probe("stellar.data", "stellar.data.loader:backend_info"),
    }


def format_info(info: dict) -> str:
    lines = []
    for section, values in info.items():
        lines.append(f"{section}:")
        for key, value in values.items():
            if isinstance(value, (list, tuple)):
                lines.append(f"  {key}:")
                lines.extend(f"    {v}" for v in value)
            else:
                lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def main(argv=None) -> int:
    print(format_info(collect_info()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

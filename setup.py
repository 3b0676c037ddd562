"""Build and install `stellar`.

Knobs (environment variables):
  STELLAR_SKIP_EXT=1     do not build the C++/CUDA extension stellar._C at all
  (the C++/CUDA extension knobs are documented where the extension is built, below)

The top-level `kernels/` folder installs as `stellar.kernels` (a top-level `kernels` package
would shadow the unrelated `kernels` package that transformers imports).
"""
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    """The C++/CUDA extension stellar._C (filled in by the extension work)."""
    return [], {}


ext_modules, cmdclass = _extensions()

setup(
    name="stellar",
    version="0.1.0",
    description="Fast STELLAR: sparse concept tokens x localization, with fused Triton kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["stellar", "stellar.*"]) + ["stellar.kernels"],
    package_dir={"stellar.kernels": "kernels"},
    package_data={"stellar": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.11,<2.15",
        "torchvision>=0.26,<0.30",
        "numpy>=1.24",
        "pillow>=9",
        "pyyaml>=6",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "tensorboard>=2.12",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "ninja"],
        "dali": ["nvidia-dali-cuda130"],
        "triton": ["triton>=3.4"],
    },
    entry_points={"console_scripts": ["stellar=stellar.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)

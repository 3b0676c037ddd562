# Two commands for a newcomer:
#   make demo   set up .venv, pretrain the tiny model on the embedded data, kNN-evaluate, draw concept maps
#   make test   set up .venv and run the whole test suite (what .ci/run calls)
# On a lent GPU machine (no registry there): `make gpu` builds and runs every GPU check and benchmark.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch and torchvision come from the local disk on our machines; the ranges in setup.py admit 2.11..2.14.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test bench gpu gpu-wheels clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH_PINS) ninja pybind11
	$(PIP) install -q --no-build-isolation -e '.[dev,dali]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/stellar demo --out runs/demo

# tests/conftest.py sets TRITON_INTERPRET=1 where no GPU is present; with a GPU the kernels run for real.
test: setup
	$(PY) -m pytest tests -q -p no:cacheprovider

bench: setup
	TRITON_INTERPRET=1 $(PY) -m pytest benchmarks/bench_*.py -q

# Every GPU check and benchmark in one command, under 9 minutes (benchmarks/gpu.sh says what runs);
# uses the machine's python (PYTHON=...), installs nothing from a registry (GPU_CARRIED=...: the
# wheels of `make gpu-wheels`, carried in parts).
gpu:
	bash benchmarks/gpu.sh

# The wheels the GPU machine lacks (DALI and what it loads, torchao), downloaded here for its
# Python 3.12 and split into parts of <= 58 MiB under build/gpu-carry (ignored), one per device
# call; prints the calls (benchmarks/RESULTS.md's header has them too).
gpu-wheels:
	bash benchmarks/gpu_wheels.sh

clean:
	rm -rf $(VENV) build *.egg-info runs

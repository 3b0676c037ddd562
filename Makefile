# Two commands for a newcomer:
#   make demo   set up .venv, pretrain the tiny model on the embedded data, kNN-evaluate, draw concept maps
#   make test   set up .venv and run the whole test suite (what .ci/run calls)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch and torchvision come from the local disk on our machines; the ranges in setup.py admit 2.11..2.14.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH_PINS) ninja pybind11
	$(PIP) install -q --no-build-isolation -e '.[dev,dali]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/stellar demo --out runs/demo

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q -p no:cacheprovider

bench: setup
	TRITON_INTERPRET=1 $(PY) -m pytest benchmarks/bench_*.py -q

clean:
	rm -rf $(VENV) build *.egg-info runs

#!/usr/bin/env bash
# The loaders on a lent GPU (a part of `make gpu`): how far nvJPEG and DALI "mixed" are from the
# Pillow reference (the decoders' difference, per folder), then decode + views throughput per
# backend at the public view configuration. Logs what it prints; copy into benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
"$PY" benchmarks/data_backends.py --batches 10
"$PY" benchmarks/bench_loader.py --images 640 --batch 128 --batches 4

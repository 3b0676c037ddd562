#!/usr/bin/env bash
# One command for a lent GPU (torch 2.11, python 3.12, nvcc 13.0 there): build stellar._C with
# its CUDA sources, check the CUDA op against the PyTorch reference (apply_crops, float64) and
# the C++ CPU body, then time the 17 views of a 128-image batch. Prints a short table last;
# copy it into benchmarks/RESULTS.md with the date, device, versions and commit.
#   bash benchmarks/gpu_multicrop.sh
# Knobs: PYTHON (default python, else python3); SKIP_BUILD=1 and SKIP_TESTS=1 (`make gpu` has
# built the extension and run these tests in its earlier parts).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  echo "== build (prints what it builds)"
  MAX_JOBS=${MAX_JOBS:-8} $PY -m pip install --no-build-isolation --no-deps --use-pep517 -e . 2>&1 | grep -E "stellar setup|error|Successfully" || true
fi
$PY -c "from stellar._ext import extension_info as i; d = i(); print(d); assert d['cuda'] and not d['error'], d"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "== correctness: CUDA op vs apply_crops (float64) and vs the CPU op"
  $PY -m pytest tests/test_multicrop_op.py tests/test_build.py -q -p no:cacheprovider -k "cuda or build or extension" 2>&1 | tail -3
fi

echo "== timings"
$PY - <<'EOF'
import torch
from benchmarks.bench_multicrop import make_batch, run_op
from stellar.data.augment import apply_crops
images, big, small = make_batch(16, "cuda", seed=1)
out_big, out_small = run_op(images, big, small)
cpu = [im.cpu() for im in images]
for rows, out, size in ((big[::5], out_big[::5], 224), (small[::5], out_small[::5], 96)):
    ref = apply_crops(cpu, rows, size, normalize=False, dtype=torch.float64)
    err = (out.double().cpu() - ref).abs().max().item()
    print(f"batch check {size}px: max |CUDA - reference| = {err:.2e}")
    assert err < 1e-5, err
EOF
PYTHONPATH=. $PY benchmarks/bench_multicrop.py --device cuda --batch 128

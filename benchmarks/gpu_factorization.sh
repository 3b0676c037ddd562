#!/usr/bin/env bash
# The factorization on a lent GPU, in one command (run from the repository root):
#
#     bash benchmarks/gpu_factorization.sh
#
# 1. installs the package editable if `stellar` is not importable (no deps, no build isolation,
#    no C++ extension: the factorization needs none),
# 2. checks the Triton kernels against the float64 reference on the GPU (bf16 < 1e-2, fp32 < 1e-3
#    relative error; Z, L and all three gradients; r 1/16/128, D up to 2100) and runs the
#    factorization tests on CUDA,
# 3. runs the benchmark (eager, torch.compile, Triton; fwd and fwd+bwd; GB/s and the fraction of
#    a device copy measured in the same run), and prints a short table last.
# Logs go to $OUT (default runs/gpu_factorization). Knobs: PYTHON (default python), SKIP_TESTS=1.
set -uo pipefail
OUT="${OUT:-runs/gpu_factorization}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
status=0

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  git rev-parse HEAD 2>/dev/null || echo "commit: unknown (no .git here)"
} | tee "$OUT/env.txt"

if ! "$PY" -c "import stellar.kernels" 2>/dev/null; then
  echo "== installing stellar (editable, no deps)"
  STELLAR_SKIP_EXT=1 "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 \
    || { echo "install failed: see $OUT/install.log"; tail -20 "$OUT/install.log"; exit 1; }
fi
"$PY" - <<'EOF' | tee -a "$OUT/env.txt"
import json, torch, stellar.kernels as k
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
print(json.dumps(k.backend_info()))
EOF

echo "== correctness: Triton vs float64 reference on the GPU"
"$PY" benchmarks/bench_factorization.py check 2>&1 | tee "$OUT/check.log"
check_rc=${PIPESTATUS[0]}
[ "$check_rc" -eq 0 ] || status=1

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "== tests on CUDA"
  timeout 300 "$PY" -m pytest tests/test_factorize.py tests/test_factorize_compile.py -q -p no:cacheprovider \
    >"$OUT/tests.log" 2>&1
  tests_rc=$?
  tail -3 "$OUT/tests.log"
  [ "$tests_rc" -eq 0 ] || status=1
fi

echo "== benchmark"
if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
  "$PY" -m pytest benchmarks/bench_factorization.py --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT/bench.json" --benchmark-columns=median,iqr,rounds >"$OUT/bench.log" 2>&1
  bench_rc=$?
  tail -5 "$OUT/bench.log"
  [ "$bench_rc" -eq 0 ] || status=1
  table=$("$PY" benchmarks/bench_factorization.py "$OUT/bench.json")
else
  echo "(pytest-benchmark not installed: timing the same cases with CUDA events)"
  table=$("$PY" benchmarks/bench_factorization.py run "$OUT/bench.json" 2>"$OUT/bench.log") || status=1
fi
echo "$table" >"$OUT/table.txt"

echo
echo "== summary (median; GB/s over the floor bytes; copy% of the same-run copy bandwidth)"
echo "correctness: $([ "$check_rc" -eq 0 ] && echo PASS || echo FAIL) (details: $OUT/check.log)"
echo "$table"
exit $status

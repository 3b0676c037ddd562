#!/usr/bin/env bash
# The factorization on a lent GPU, in one command (run from the repository root):
#
#     bash benchmarks/gpu_factorization.sh
#
# Within FACT_BUDGET_S seconds (default 170; each step under `timeout`, so the summary always
# prints), logs under $OUT (default runs/gpu_factorization):
#   0. installs the package editable if `stellar` is not importable (no deps, no build isolation,
#      no C++ extension: the factorization needs none);
#   1. report   (CPU, in the background from the start; SKIP_REPORT=1 skips it, as `make gpu` does:
#               it needs no GPU, and it competes with the timings for the CPU) the compile report
#               of our Triton kernels for sm_90 with this machine's Triton: registers, spills,
#               tensor-core use, waves (benchmarks/kernel_report.py --set ci --strict);
#   2. tune     (TUNE=0 skips it) a triton.testing.do_bench sweep of the tile table's neighbourhood for the
#               production keys, winners written into kernels/factorize_tiles.py with the device
#               in a comment (copied to $OUT/factorize_tiles.py; commit it); every step after this
#               one measures the tuned table; plus each MIX choice's time and error;
#   3. check    Triton vs the float64 reference on the GPU (Z, L and the three gradients; bf16,
#               fp16, fp32 and fp32 with TF32; r 1/16/32/128, D up to 2100, unaligned widths);
#   4. tests    the factorization tests on CUDA (skipped with SKIP_TESTS=1, as `make gpu` does);
#   5. bench    eager, torch.compile and Triton, fwd and fwd+bwd, GB/s and the fraction of a device
#               copy measured in the same run (BENCH_K: a pytest -k selection of the cases, e.g.
#               "B128-N196-D768": each torch.compile case compiles for ~10-20 s);
# and prints a short summary last (copy it into benchmarks/RESULTS.md with date, device, versions).
# Knobs: PYTHON (default python, else python3), OUT, FACT_BUDGET_S, SKIP_TESTS=1, SKIP_REPORT=1, TUNE=0,
# TUNE_BUDGET_S (default a quarter), BENCH_K.
# A caller that runs this under its own `timeout` must pass FACT_BUDGET_S below that timeout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_factorization}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
TOTAL="${FACT_BUDGET_S:-170}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
START=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
STATUS=()
step() {  # step NAME BUDGET_S COMMAND...: run under timeout, log to $OUT/NAME.log
  local name=$1 budget=$2; shift 2
  local avail; avail=$(( $(left) - 15 ))  # keep time for the summary
  [ "$budget" -gt "$avail" ] && budget=$avail
  if [ "$budget" -lt 5 ]; then STATUS+=("$name: SKIPPED (budget)"); return 1; fi
  echo "== $name (budget ${budget}s, log $OUT/$name.log)"
  timeout --kill-after=5 "$budget" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  case $rc in 0) STATUS+=("$name: PASS") ;; 124|137) STATUS+=("$name: TIMEOUT after ${budget}s") ;; *) STATUS+=("$name: FAIL ($rc)") ;; esac
  tail -n 8 "$OUT/$name.log"
  return $rc
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  git rev-parse HEAD 2>/dev/null || echo "commit: unknown (no .git here)"
} | tee "$OUT/env.txt"

if ! "$PY" -c "import stellar.kernels" 2>/dev/null; then
  echo "== installing stellar (editable, no deps)"
  STELLAR_SKIP_EXT=1 "$PY" -m pip install --no-build-isolation --no-deps --use-pep517 -e . >"$OUT/install.log" 2>&1 \
    || { echo "install failed: see $OUT/install.log"; tail -20 "$OUT/install.log"; exit 1; }
fi
"$PY" - <<'EOF' | tee -a "$OUT/env.txt"
import json, torch, triton, stellar.kernels as k
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
print(json.dumps(k.backend_info()))
EOF

# 1. the compile report needs no GPU: it runs on the CPU cores while the GPU steps run
report_pid=
if [ "${SKIP_REPORT:-0}" != 1 ]; then
  report_budget=$(( TOTAL - 20 ))
  timeout --kill-after=5 "$report_budget" "$PY" benchmarks/kernel_report.py --set ci --strict --no-cuda \
    --jobs "$(( $(nproc) > 4 ? $(nproc) / 2 : 2 ))" --json "$OUT/report.json" >"$OUT/report.log" 2>&1 &
  report_pid=$!
fi

# 2. tune the table (writes kernels/factorize_tiles.py), then everything below uses it
if [ "${TUNE:-1}" = 1 ]; then
  tune_budget="${TUNE_BUDGET_S:-$(( TOTAL / 4 ))}"
  step tune $(( tune_budget + 25 )) "$PY" benchmarks/bench_factorization.py tune --write --mix --budget-s "$tune_budget"
  cp kernels/factorize_tiles.py "$OUT/factorize_tiles.py"
fi

# 3. correctness on the GPU
step check 60 "$PY" benchmarks/bench_factorization.py check  # ~70 kernel binaries to compile (~40 s of CPU)
check_rc=$?

# 4. tests on CUDA
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  step tests 50 "$PY" -m pytest tests/test_factorize.py tests/test_factorize_compile.py -q -x -p no:cacheprovider
fi

# 5. benchmark
if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
  step bench 90 "$PY" -m pytest benchmarks/bench_factorization.py --benchmark-only -q -p no:cacheprovider \
    ${BENCH_K:+-k "$BENCH_K"} --benchmark-json="$OUT/bench.json" --benchmark-columns=median,iqr,rounds
else
  step bench 90 "$PY" benchmarks/bench_factorization.py run "$OUT/bench.json"
fi
table=$([ -s "$OUT/bench.json" ] && "$PY" benchmarks/bench_factorization.py "$OUT/bench.json" 2>/dev/null)

# the report: wait for it, but not past the budget
if [ -n "$report_pid" ]; then
  while kill -0 "$report_pid" 2>/dev/null && [ "$(left)" -gt 5 ]; do sleep 1; done
  if kill -0 "$report_pid" 2>/dev/null; then
    kill "$report_pid" 2>/dev/null; STATUS+=("report: TIMEOUT (see $OUT/report.log)")
  else
    wait "$report_pid"; rc=$?
    STATUS+=("report: $([ "$rc" -eq 0 ] && echo PASS || echo "FAIL ($rc)")")
  fi
fi

echo
echo "== summary ($(( $(date +%s) - START )) s; logs in $OUT$([ "${TUNE:-1}" = 1 ] && echo "; tuned table: $OUT/factorize_tiles.py"))"
printf '%s\n' "${STATUS[@]}"
echo "correctness: $([ "${check_rc:-1}" -eq 0 ] && echo PASS || echo FAIL) (details: $OUT/check.log)"
grep -E "^\| \(|^\| MIX" "$OUT/tune.log" 2>/dev/null | head -40
tail -n 1 "$OUT/report.log" 2>/dev/null
echo "$table"
[ "${check_rc:-1}" -eq 0 ] && ! printf '%s\n' "${STATUS[@]}" | grep -q -E "FAIL|TIMEOUT"

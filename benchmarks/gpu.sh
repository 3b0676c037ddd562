#!/usr/bin/env bash
# `make gpu`: everything a lent GPU has to measure, in one command, inside ~8 minutes
# (H100/H200, torch 2.11, Python 3.12, no package registry). Run it from the repository root:
#
#     make gpu                         (or: bash benchmarks/gpu.sh)
#
# In order, each with its own time budget and a log under $OUT (default runs/gpu):
#   1. build     wheels carried in build/wheels (torchao for train.fp8: `make gpu-wheels` on a
#                machine with a registry), then stellar editable with its CUDA extension
#   2. tests     the GPU tests: the step's no-sync and prefetch tests, the prototype CE, the
#                multi-crop op, the loaders, the factorization (Triton for real: no TRITON_INTERPRET),
#                the decoders on odd images (nvJPEG, DALI mixed, to_rgb8/apply_orientation on CUDA)
#   3. benchmarks/gpu_factorization.sh   (its tests already ran in 2: SKIP_TESTS=1)
#   4. benchmarks/gpu_multicrop.sh
#   5. the prototype cross-entropy benchmark (benchmarks/bench_prototype_ce.py, where it exists)
#   6. benchmarks/bench_step.py          reference vs each lever vs fast (the headline)
#   7. any other benchmarks/gpu_*.sh     (e.g. gpu_distributed.sh), while time is left
# and prints one summary table last. A part that runs out of its budget is stopped and marked
# TIMEOUT; parts left when the total budget is spent are marked SKIPPED.
# Knobs: PYTHON (default python), OUT, GPU_BUDGET_S (total, default 470), STEP_ARGS (extra
# bench_step.py arguments, e.g. "--batch 64"), GPU_PARTS (only these parts, e.g. "build step" to
# rerun the step benchmark alone).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${OUT:-runs/gpu}"
TOTAL="${GPU_BUDGET_S:-470}"
mkdir -p "$OUT"
unset TRITON_INTERPRET            # the Triton kernels run for real here
START=$(date +%s)
SUMMARY=()

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( TOTAL - $(elapsed) )); }

# part NAME BUDGET_S HEADLINE_CMD -- COMMAND...: run COMMAND under `timeout`, log to $OUT/NAME.log.
part() {
  local name=$1 budget=$2 headline=$3; shift 4
  local avail; avail=$(left)
  if [ -n "${GPU_PARTS:-}" ] && ! [[ " $GPU_PARTS " == *" $name "* ]]; then
    SUMMARY+=("| $name | SKIPPED | 0 | not in GPU_PARTS |"); return
  fi
  if [ "$avail" -lt 20 ]; then
    SUMMARY+=("| $name | SKIPPED | 0 | total budget spent |"); echo "== $name: skipped (budget)"; return
  fi
  [ "$budget" -gt "$avail" ] && budget=$avail
  echo "== $name (budget ${budget}s, log $OUT/$name.log)"
  local t0=$(date +%s) rc status
  timeout --kill-after=10 "$budget" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  case $rc in 0) status=PASS ;; 124|137) status=TIMEOUT ;; *) status="FAIL($rc)" ;; esac
  tail -n 25 "$OUT/$name.log"
  local line; line=$(eval "$headline" 2>/dev/null | tr '|' '/' | head -c 160)
  SUMMARY+=("| $name | $status | $(( $(date +%s) - t0 )) | ${line:--} |")
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
  git rev-parse --short HEAD 2>/dev/null || echo "commit: unknown"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')"
} | tee "$OUT/env.txt"

BUILD='set -e
if ls build/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install --no-index --no-deps build/wheels/*.whl || echo "carried wheels did not install"
fi
MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install --no-build-isolation --no-deps -e . 2>&1 | grep -E "stellar setup|rror|Successfully" || true
"$PY" -m stellar.info'
part build 200 "grep -m1 -E 'xformers' '$OUT/build.log'" -- env PY="$PY" bash -c "$BUILD"

TESTS="tests/test_step.py tests/test_prototype_ce.py tests/test_multicrop_op.py tests/test_factorize.py \
tests/test_factorize_compile.py tests/test_loader.py tests/test_backends.py tests/test_dali.py tests/test_odd_images.py"
existing=$(for f in $TESTS; do [ -f "$f" ] && echo "$f"; done)
part tests 100 "grep -E '(passed|failed|error)' '$OUT/tests.log' | tail -1" -- \
  "$PY" -m pytest $existing -q -x -p no:cacheprovider -k "cuda or gpu or CUDA or GPU or triton or sync or prefetch"

part factorization 90 "grep -m1 -E '^correctness:' '$OUT/factorization.log'" -- \
  env SKIP_TESTS=1 FACT_BUDGET_S=80 OUT="$OUT/factorization" PYTHON="$PY" bash benchmarks/gpu_factorization.sh

part multicrop 60 "grep -E 'ms|img/s' '$OUT/multicrop.log' | tail -1" -- env PYTHON="$PY" bash benchmarks/gpu_multicrop.sh

if [ -f benchmarks/bench_prototype_ce.py ]; then
  part prototype_ce 50 "tail -1 '$OUT/prototype_ce.log'" -- \
    "$PY" benchmarks/bench_prototype_ce.py --budget-s 35 --json "$OUT/prototype_ce.json"
else
  SUMMARY+=("| prototype_ce | SKIPPED | 0 | benchmarks/bench_prototype_ce.py not in this tree |")
fi

others=$(ls benchmarks/gpu_*.sh 2>/dev/null | grep -v -E 'gpu_(factorization|multicrop)\.sh|/gpu\.sh$' || true)
# The step benchmark is the headline: it takes what is left but 45 s for each later script, at
# most 240 s, at least 150 s (later scripts are then skipped rather than the step cut short).
reserve=$(( 45 * $(echo "$others" | grep -c . || true) ))
step_budget=$(( $(left) - reserve ))
[ "$step_budget" -gt 240 ] && step_budget=240
[ "$step_budget" -lt 150 ] && step_budget=150
step_headline="'$PY' benchmarks/bench_step.py --headline '$OUT/step.json'"
# shellcheck disable=SC2086
part step "$step_budget" "$step_headline" -- \
  "$PY" benchmarks/bench_step.py --json "$OUT/step.json" --budget-s $(( step_budget * 55 / 100 )) ${STEP_ARGS:-}

for script in $others; do
  name=$(basename "$script" .sh)
  part "$name" 120 "tail -1 '$OUT/$name.log'" -- env PYTHON="$PY" OUT="$OUT/$name" bash "$script"
done

echo
echo "== summary ($(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(elapsed) s in all; logs in $OUT; copy into benchmarks/RESULTS.md)"
echo "| part | status | s | headline |"
echo "| --- | --- | --- | --- |"
printf '%s\n' "${SUMMARY[@]}"

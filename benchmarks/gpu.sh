#!/usr/bin/env bash
# `make gpu`: everything a lent GPU has to check and measure, in one command of under 9 minutes
# (H100/H200, torch 2.11, triton 3.6, Python 3.12, no package registry). From the repository root:
#
#     make gpu                                   (or: bash benchmarks/gpu.sh)
#     GPU_CARRIED=/tmp/gpu-carry make gpu        (with the wheels of `make gpu-wheels`, carried in parts)
#
# The device-call sequence that carries the wheels is printed by `make gpu-wheels` and written out
# in benchmarks/RESULTS.md's header. In order, each part under `timeout` with its own budget, its
# log in $GPU_LOGS/NAME.log:
#   wheels        (GPU_CARRIED) the carried parts joined, sha256-checked and installed with
#                 pip --no-deps --target /tmp/stellar-site, which goes on PYTHONPATH for every part
#                 (DALI and what it loads, torchao); without them the DALI tests skip and say why
#   build         stellar editable with its CUDA extension, then `stellar info`
#   kernel_tests  tests/test_factorize*.py and test_prototype_ce.py whole, Triton for real (no
#                 TRITON_INTERPRET), in 8 pytest-xdist workers where xdist is installed: each
#                 first launch of a kernel configuration compiles (~0.5 s of CPU per binary;
#                 the tests touch ~200: benchmarks/RESULTS.md)
#   gpu_tests     the CUDA tests of the multi-crop op, the build, the step (no-sync, prefetch,
#                 fast model vs reference), the loaders and the decoders (-k cuda/gpu/...)
#   step          benchmarks/bench_step.py, reference vs each lever vs fast (the headline)
#   factorization benchmarks/gpu_factorization.sh: Triton vs float64 on the device, then eager vs
#                 torch.compile vs Triton at B128 N196 D768 (FACT_TUNE=1 adds the tile sweep and
#                 the MIX timings; the compile report is not rerun here: it needs no GPU)
#   prototype_ce  benchmarks/bench_prototype_ce.py: float64 check, then fused vs eager vs compile
#   multicrop     benchmarks/gpu_multicrop.sh: the batch check and the timing (built and tested above)
#   gpu_*.sh      the other scripts (loaders, eval, distributed), while time is left
# A part that outruns its budget is stopped and marked TIMEOUT; parts left when the total budget
# is spent are SKIPPED (run them next time with GPU_PARTS).
#
# Results: $GPU_LOGS/results.md, an entry ready for benchmarks/RESULTS.md (date, device, versions,
# commit, command, the summary table and each part's closing lines), printed last. Where $OUT is
# set (a lent machine returns that folder, at most 8 files), after every part: $OUT/results.md,
# $OUT/gpu_logs.tar.gz (the logs and JSON) and, when the sweep ran, $OUT/factorize_tiles.py.
# Knobs: PYTHON (default python, else python3), GPU_LOGS (default runs/gpu/<UTC time>),
# GPU_BUDGET_S (total, default 540), GPU_PARTS (only these, e.g. "build step"), GPU_CARRIED, KT_FILES
# (the kernel test files), KT_BUDGET_S / GT_BUDGET_S (the test parts' budgets), KERNEL_BENCH_S (kept
# for the kernel benchmarks after the step),
# STEP_ARGS (extra bench_step.py arguments), FACT_TUNE=1, STELLAR_COMMIT (the commit, where the
# copy has no .git, as on a lent machine).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
LOGS="${GPU_LOGS:-runs/gpu/$(date -u +%Y%m%d-%H%M%S)}"
EXPORT="${OUT:-}"
TOTAL="${GPU_BUDGET_S:-540}"
mkdir -p "$LOGS"
unset TRITON_INTERPRET            # the Triton kernels run for real here
START=$(date +%s)
SUMMARY=()
NOTES=()

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( TOTAL - $(elapsed) )); }
wanted() { [ -z "${GPU_PARTS:-}" ] || [[ " $GPU_PARTS " == *" $1 "* ]]; }

# part NAME BUDGET_S HEADLINE_CMD -- COMMAND...: run COMMAND under `timeout`, log to $LOGS/NAME.log.
part() {
  local name=$1 budget=$2 headline=$3; shift 4
  local avail; avail=$(left)
  if ! wanted "$name"; then
    SUMMARY+=("| $name | SKIPPED | 0 | not in GPU_PARTS |"); return
  fi
  if [ "$avail" -lt 20 ]; then
    SUMMARY+=("| $name | SKIPPED | 0 | total budget spent |"); echo "== $name: skipped (budget)"; return
  fi
  [ "$budget" -gt "$avail" ] && budget=$avail
  echo "== $name (budget ${budget}s, log $LOGS/$name.log)"
  local t0=$(date +%s) rc status
  timeout --kill-after=10 "$budget" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  case $rc in 0) status=PASS ;; 124|137) status=TIMEOUT ;; *) status="FAIL($rc)" ;; esac
  tail -n 25 "$LOGS/$name.log"
  local line; line=$(eval "$headline" 2>/dev/null | tr '|' '/' | head -c 160)
  SUMMARY+=("| $name | $status | $(( $(date +%s) - t0 )) | ${line:--} |")
  export_results
}

commit() {
  git rev-parse --short HEAD 2>/dev/null && return
  echo "${STELLAR_COMMIT:-unknown (no .git in this copy: pass STELLAR_COMMIT=<hash>)}"
}

# The entry for benchmarks/RESULTS.md: what ran where, the summary, each part's closing lines.
results_md() {
  echo "## $(date -u +%Y-%m-%d) -- \`make gpu\` on $(cut -d, -f1 "$LOGS/env.txt" 2>/dev/null | head -1)"
  echo "- Machine: $(head -1 "$LOGS/env.txt" 2>/dev/null); $(nproc) CPU cores."
  echo "- Versions: $(sed -n 2p "$LOGS/env.txt" 2>/dev/null)"
  echo "- Commit: $(commit)$(git status --porcelain 2>/dev/null | grep -q . && echo ' + uncommitted changes')."
  echo "- Command: \`${GPU_CARRIED:+GPU_CARRIED=$GPU_CARRIED }${GPU_PARTS:+GPU_PARTS=\"$GPU_PARTS\" }${STEP_ARGS:+STEP_ARGS=\"$STEP_ARGS\" }${FACT_TUNE:+FACT_TUNE=$FACT_TUNE }GPU_BUDGET_S=$TOTAL make gpu\`, $(elapsed) s in all."
  for note in "${NOTES[@]}"; do echo "- $note"; done
  echo
  echo "| part | status | s | headline |"
  echo "| --- | --- | --- | --- |"
  printf '%s\n' "${SUMMARY[@]}"
  local row name
  for row in "${SUMMARY[@]}"; do
    name=$(echo "$row" | cut -d'|' -f2 | tr -d ' ')
    [ -s "$LOGS/$name.log" ] || continue
    echo
    echo "$name (last lines of $name.log):"
    echo '```text'
    tail -n "${RESULT_LINES:-30}" "$LOGS/$name.log"
    echo '```'
  done
}

# What comes back from a lent machine: at most 8 files under $OUT, so three.
export_results() {
  results_md >"$LOGS/results.md"
  [ -n "$EXPORT" ] && [ -d "$EXPORT" ] || return 0
  cp "$LOGS/results.md" "$EXPORT/results.md"
  (cd "$(dirname "$LOGS")" && find "$(basename "$LOGS")" -type f -size -8M \( -name '*.log' -o -name '*.json' \
    -o -name '*.txt' -o -name '*.md' -o -name '*.py' \) | tar -czf "$EXPORT/gpu_logs.tar.gz" -T -)
  [ -f "$LOGS/factorization/factorize_tiles.py" ] && cp "$LOGS/factorization/factorize_tiles.py" "$EXPORT/"
  return 0
}

# Wheels carried in parts (make gpu-wheels): join, check, install into /tmp/stellar-site.
install_carried() {
  local dir=$1 site=/tmp/stellar-site tarball=/tmp/stellar-wheels.tar
  local parts; parts=$(ls "$dir"/wheels.tar.part* 2>/dev/null)
  if [ -z "$parts" ] || [ ! -f "$dir/wheels.tar.sha256" ]; then
    echo "GPU_CARRIED=$dir holds no wheels.tar.part* and wheels.tar.sha256"; return 1
  fi
  cat $parts >"$tarball"
  if ! (cd /tmp && sed "s#  .*#  $tarball#" "$dir/wheels.tar.sha256" | sha256sum -c --quiet -); then
    echo "the parts in $dir ($(echo $parts | wc -w)) do not join to the tar make gpu-wheels split: a part is missing or from another run"
    return 1
  fi
  rm -rf /tmp/stellar-wheels && mkdir -p /tmp/stellar-wheels && tar -xf "$tarball" -C /tmp/stellar-wheels
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" /tmp/stellar-wheels/*.whl || return 1
  ls /tmp/stellar-wheels
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA', torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else '', 'SMs')"
} >"$LOGS/env.txt" 2>&1
cat "$LOGS/env.txt"

if [ -n "${GPU_CARRIED:-}" ] && wanted wheels; then
  echo "== wheels (log $LOGS/wheels.log)"
  if timeout 120 bash -c "$(declare -f install_carried); PY='$PY' install_carried '$GPU_CARRIED'" >"$LOGS/wheels.log" 2>&1; then
    export PYTHONPATH="/tmp/stellar-site${PYTHONPATH:+:$PYTHONPATH}"
    SUMMARY+=("| wheels | PASS | $(elapsed) | $(ls /tmp/stellar-wheels | wc -l) wheels on PYTHONPATH |")
  else
    SUMMARY+=("| wheels | FAIL | $(elapsed) | $(tail -1 "$LOGS/wheels.log" | tr '|' '/' | head -c 160) |")
  fi
  tail -n 5 "$LOGS/wheels.log"
fi
export_results

# --use-pep517: without it, pip (no pyproject.toml) runs setuptools' legacy `develop`, which on
# setuptools >= 80 calls pip again *with* build isolation, i.e. the registry (seen on the lent H200).
BUILD='set -eo pipefail
MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install --no-build-isolation --no-deps --use-pep517 -e . 2>&1 \
  | { grep -E "stellar setup|rror|Successfully" || true; }
"$PY" -c "import stellar.kernels, stellar._C" || { echo "build: stellar.kernels / stellar._C do not import"; exit 1; }
"$PY" -m stellar.info'
part build 150 "grep -m1 -E 'xformers' '$LOGS/build.log'" -- env PY="$PY" bash -c "$BUILD"
NOTES+=("DALI: $("$PY" -c "from stellar.data.dali import dali_status; ok, why = dali_status(); print(__import__('nvidia.dali').dali.__version__ if ok else 'not usable: ' + str(why))" 2>&1 | tail -1)")

# -rfEs: the reasons of every skip (a missing package, no second GPU) land in the log.
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfEs --durations=15)
part kernel_tests "${KT_BUDGET_S:-110}" "grep -E '(passed|failed|error)' '$LOGS/kernel_tests.log' | tail -1" -- \
  "${PYTEST[@]}" $XDIST ${KT_FILES:-tests/test_factorize.py tests/test_factorize_compile.py tests/test_prototype_ce.py}

TESTS="tests/test_multicrop_op.py tests/test_build.py tests/test_step.py tests/test_loader.py tests/test_backends.py \
tests/test_dali.py tests/test_odd_images.py"
existing=$(for f in $TESTS; do [ -f "$f" ] && echo "$f"; done)
part gpu_tests "${GT_BUDGET_S:-100}" "grep -E '(passed|failed|error)' '$LOGS/gpu_tests.log' | tail -1" -- \
  "${PYTEST[@]}" $existing -k "cuda or gpu or CUDA or GPU or triton or sync or prefetch"

others=$(ls benchmarks/gpu_*.sh 2>/dev/null | grep -v -E 'gpu_(factorization|multicrop|wheels)\.sh' || true)
# The step benchmark is the headline: what is left but ~200 s for the kernel benchmarks, at most
# 240 s, at least 150 s (then the kernel benchmarks get what remains).
step_budget=$(( $(left) - ${KERNEL_BENCH_S:-200} ))
[ "$step_budget" -gt 240 ] && step_budget=240
[ "$step_budget" -lt 120 ] && step_budget=120
[ "$step_budget" -gt "$(left)" ] && step_budget=$(left)   # the script's own budget follows the part's
# shellcheck disable=SC2086
part step "$step_budget" "'$PY' benchmarks/bench_step.py --headline '$LOGS/step.json'" -- \
  "$PY" benchmarks/bench_step.py --json "$LOGS/step.json" --budget-s $(( step_budget * 55 / 100 )) ${STEP_ARGS:-}

fact_budget=$([ "${FACT_TUNE:-0}" = 1 ] && echo 240 || echo 130)
[ "$fact_budget" -gt $(( $(left) - 60 )) ] && fact_budget=$(( $(left) - 60 ))   # leave the prototype CE and multi-crop a minute
[ "$fact_budget" -lt 40 ] && fact_budget=40
part factorization "$fact_budget" "grep -m1 -E '^correctness:' '$LOGS/factorization.log'" -- \
  env SKIP_TESTS=1 SKIP_REPORT=1 TUNE="${FACT_TUNE:-0}" BENCH_K="B128-N196-D768 or decoder_projection" \
  FACT_BUDGET_S=$(( fact_budget - 10 )) OUT="$LOGS/factorization" \
  PYTHON="$PY" bash benchmarks/gpu_factorization.sh

part prototype_ce 60 "tail -1 '$LOGS/prototype_ce.log'" -- \
  "$PY" benchmarks/bench_prototype_ce.py --budget-s 40 --json "$LOGS/prototype_ce.json"

part multicrop 40 "grep -E 'ms|img/s' '$LOGS/multicrop.log' | tail -1" -- \
  env SKIP_BUILD=1 SKIP_TESTS=1 PYTHON="$PY" bash benchmarks/gpu_multicrop.sh

for script in $others; do
  name=$(basename "$script" .sh)
  part "$name" 120 "tail -1 '$LOGS/$name.log'" -- env PYTHON="$PY" OUT="$LOGS/$name" bash "$script"
done

export_results
echo
echo "== results.md, the entry for benchmarks/RESULTS.md:"
cat "$LOGS/results.md"
echo
echo "== summary ($(commit), $(elapsed) s in all; logs in $LOGS${EXPORT:+; results.md and gpu_logs.tar.gz in $EXPORT})"
echo "| part | status | s | headline |"
echo "| --- | --- | --- | --- |"
printf '%s\n' "${SUMMARY[@]}"

#!/usr/bin/env bash
# `make gpu-wheels`: the Python packages the lent GPU machine lacks (it has no package registry),
# downloaded HERE for its Python 3.12 / x86-64 into build/gpu-wheels/, packed into one tar and
# split into parts small enough to travel one per device call (a call carries at most 64 MiB,
# the working tree included). Run it on a machine with a registry, then follow the calls it
# prints (the same sequence is in benchmarks/RESULTS.md's header).
#
# What is carried, and why (the GPU image has numpy, packaging, six, typing-extensions, pyyaml and
# the CUDA 13 libraries torch needs, but none of these):
#   nvidia-dali-cuda130 2.4.0   the dali loader backend and the DALI tests (199 MB)
#   nvidia-nvimgcodec-cu13      DALI's image decoders (CPU and mixed) live in it
#   nvidia-nvjpeg, nvidia-nvtiff-cu13
#                               what nvImageCodec loads for JPEG on the GPU (found through its
#                               RUNPATH, ../../cu13/lib) and for TIFF (without it DALI prints an
#                               [ERROR] line at every start)
#   optree, gast, astunparse    what `import nvidia.dali` imports
#   torchao                     train.fp8 (bench_step's fp8 lever)
# DALI's other requirements (libnvcomp, libcst, makefun, nvtx) are not needed for this project:
# with exactly this set, in a clean environment holding only what the GPU image holds, `import
# nvidia.dali` and the DALI tests' CPU pipelines pass (checked 2026-11-27 on Python 3.11 with the
# cp311 builds of the three compiled ones). Versions: those this project's CPU environment resolves.
#
# Knobs: PART_MIB (default 58: a part plus a working tree of up to ~6 MiB stays under 64 MiB),
# PIP (default .venv/bin/pip, else pip3).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-$( [ -x .venv/bin/pip ] && echo .venv/bin/pip || echo pip3 )}"
PART_MIB="${PART_MIB:-58}"
WHEELS=build/gpu-wheels
CARRY=build/gpu-carry
PKGS=(
  "nvidia-dali-cuda130==2.4.0" "nvidia-nvimgcodec-cu13==0.9.0.20" "nvidia-nvjpeg==13.3.2.43"
  "nvidia-nvtiff-cu13==0.8.0.82" "optree==0.20.0" "gast==0.7.0" "astunparse==1.6.3" "torchao==0.18.0"
)
mkdir -p "$WHEELS" "$CARRY"
rm -f "$CARRY"/*
for pkg in "${PKGS[@]}"; do
  "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$WHEELS" "$pkg"
done
# one version of each package: an older download of another version would stop the install there
dupes=$(ls "$WHEELS"/*.whl | xargs -n1 basename | cut -d- -f1 | sort | uniq -d)
[ -z "$dupes" ] || { echo "two versions of: $dupes in $WHEELS (remove the old ones)" >&2; exit 1; }

tar -C "$WHEELS" -cf "$CARRY/wheels.tar" .
(cd "$CARRY" && sha256sum wheels.tar > wheels.tar.sha256)
split -b "${PART_MIB}M" -d -a 1 "$CARRY/wheels.tar" "$CARRY/wheels.tar.part"
rm "$CARRY/wheels.tar"
parts=("$CARRY"/wheels.tar.part*)
tree_kib=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | du -c -k --files0-from=- 2>/dev/null | tail -1 | cut -f1)

echo
echo "$(du -sh "$WHEELS" | cut -f1) of wheels in $WHEELS; ${#parts[@]} parts of <= ${PART_MIB} MiB in $CARRY;"
echo "the working tree that travels with each call: ~$(( tree_kib / 1024 )) MiB (a call carries at most 64 MiB)."
echo "Device calls, back to back (a machine is given back ~30 s after a call; the parts are kept in"
echo "/tmp/gpu-carry on it, so a call that starts a fresh machine must begin again at the first):"
n=${#parts[@]}
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
for i in "${!parts[@]}"; do
  p=${parts[$i]}
  if [ "$i" -lt $(( n - 1 )) ]; then
    echo "  $(( i + 1 )). run(carry=[\"$p\", \"$CARRY/wheels.tar.sha256\"], timeout_s=120,"
    echo "         command=\"mkdir -p /tmp/gpu-carry && cp $p $CARRY/wheels.tar.sha256 /tmp/gpu-carry/ && ls -l /tmp/gpu-carry\")"
  else
    echo "  $(( i + 1 )). run(carry=[\"$p\", \"$CARRY/wheels.tar.sha256\"], timeout_s=600,"
    echo "         command=\"mkdir -p /tmp/gpu-carry && cp $p $CARRY/wheels.tar.sha256 /tmp/gpu-carry/ && GPU_CARRIED=/tmp/gpu-carry STELLAR_COMMIT=$commit bash benchmarks/gpu.sh\")"
  fi
done
echo "The last call is \`make gpu\` (bash: the image may lack make); it joins the parts, checks the"
echo "sha256, installs the wheels with pip --no-deps --target /tmp/stellar-site, runs everything with"
echo "that folder on PYTHONPATH and leaves results.md, gpu_logs.tar.gz (and a tuned factorize_tiles.py)"
echo "in \$OUT. STELLAR_COMMIT=$commit is HEAD now (the copy there has no .git): commit first, and"
echo "pass the hash of what the working tree holds when you run it."

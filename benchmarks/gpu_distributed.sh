#!/usr/bin/env bash
# One command for a lent GPU: world size 1 through the distributed path must match a plain
# `stellar pretrain` step for step, and costs how much. Runs, on synthetic batches made on the GPU
# (benchmarks/bench_distributed.py; ViT-B/16, 8+8 views, batch 64, 40 steps):
#   plain           python  bench_distributed.py run          (no process group)
#   plain again     the kernels' run-to-run noise, the yardstick for "the same"
#   torchrun x1     torchrun --standalone --nproc-per-node 1  (nccl, DDP around the model)
#   torchrun fsdp   the same with train.parallel=fsdp (bf16 parameters: reported, not required equal)
#   torchrun x2     with 2+ GPUs: 2 processes x 32 against 1 x 64 (reported; time per image = speed-up)
# then prints per-step loss differences and the median time per image of each against plain.
# Copy the printed lines into benchmarks/RESULTS.md with the date, device, versions and commit.
#   bash benchmarks/gpu_distributed.sh [key=value ...]      (e.g. train.batch_size=32 train.steps=30)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WORK=${WORK:-$(mktemp -d /tmp/stellar-gpu-distributed.XXXXXX)}
BENCH=benchmarks/bench_distributed.py
echo "== runs in $WORK"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); assert torch.cuda.is_available()"

$PY $BENCH run --out "$WORK/plain" "$@"
$PY $BENCH run --out "$WORK/plain2" "$@"
$PY -m torch.distributed.run --standalone --nproc-per-node 1 $BENCH run --out "$WORK/ddp" "$@"
$PY -m torch.distributed.run --standalone --nproc-per-node 1 $BENCH run --out "$WORK/fsdp" train.parallel=fsdp "$@"

echo "== results ($(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
status=0
$PY $BENCH compare "$WORK/plain" "$WORK/ddp" --reference "$WORK/plain2" --label "torchrun x1 ddp" || status=1
$PY $BENCH compare "$WORK/plain" "$WORK/fsdp" --label "torchrun x1 fsdp (bf16 params)" --rtol 1e9 || true

NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then
  # Several GPUs: the same global batch (64) split over 2 processes, nccl, and the speed-up.
  $PY -m torch.distributed.run --standalone --nproc-per-node 2 $BENCH run --out "$WORK/ddp2" train.batch_size=32 "$@"
  $PY $BENCH compare "$WORK/plain" "$WORK/ddp2" --label "torchrun x2 ddp, batch 2x32 (bf16: reported)" --rtol 1e9 || true
fi
exit $status

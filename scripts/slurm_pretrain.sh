#!/usr/bin/env bash
# Pretraining on several machines under SLURM: srun starts one torchrun per node, torchrun starts
# one process per GPU, and they meet through torchrun's c10d rendezvous on the first node.
#
#   sbatch --nodes 4 scripts/slurm_pretrain.sh --config configs/vitb16.yaml --out /shared/runs/b16 data.root=/data/imagenet
#   sbatch --nodes 4 scripts/slurm_pretrain.sh --resume /shared/runs/b16          # after a failure
#
# Global batch = nodes x GPUS_PER_NODE x train.batch_size (4 x 8 x 128 = 4096 with the defaults).
# --out must be on a filesystem every node sees (checkpoints, the run's lock, metrics).
# MAX_RESTARTS=N lets torchrun restart all processes after a failure; they resume from the last
# checkpoint by themselves. The rendezvous id is the job id, so a restarted rank 0 on another
# node may take over the run directory's lock left by the attempt before it.
#SBATCH --job-name=stellar-pretrain
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

PY=${PYTHON:-python}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}

echo "stellar: ${SLURM_JOB_NUM_NODES} nodes x ${GPUS_PER_NODE} GPUs, rendezvous ${HEAD_NODE}:${PORT}, job ${SLURM_JOB_ID}"
srun --kill-on-bad-exit=1 "$PY" -m torch.distributed.run \
    --nnodes "$SLURM_JOB_NUM_NODES" \
    --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d \
    --rdzv-endpoint "${HEAD_NODE}:${PORT}" \
    --rdzv-id "$SLURM_JOB_ID" \
    --max-restarts "${MAX_RESTARTS:-0}" \
    -m stellar pretrain "$@"

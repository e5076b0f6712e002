#!/usr/bin/env bash
#SBATCH --job-name=kimi-medium
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#
# medium on 4 nodes x 8 GPUs: one torchrun per node, c10d rendezvous on the first node. Submit from the
# repository root; arguments are trainer overrides:
#   sbatch slurm/train_medium.sh --train.max_steps=50000
#   sbatch --nodes=2 slurm/train_medium.sh          # fewer nodes: the global batch stays the same
# CPU-only test nodes: see slurm/train_nano.sh. Knobs, signals and requeueing: see slurm/common.sh.
CONFIG=${CONFIG:-configs/medium.yaml}
OUT_DIR=${OUT_DIR:-out/medium}
ROOT=${NANOKIMI_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f "$ROOT/slurm/common.sh" ]] || { echo "slurm: $ROOT/slurm/common.sh not found: submit from the repository root or set NANOKIMI_ROOT" >&2; exit 2; }
source "$ROOT/slurm/common.sh"

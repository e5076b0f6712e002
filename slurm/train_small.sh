#!/usr/bin/env bash
#SBATCH --job-name=kimi-small
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#
# small on one node of 8 GPUs. Submit from the repository root; arguments are trainer overrides:
#   sbatch slurm/train_small.sh --train.max_steps=20000
#   EXTRA="--parallel.ep=8" OUT_DIR=out/small-ep8 sbatch slurm/train_small.sh
# CPU-only test nodes: see slurm/train_nano.sh. Knobs, signals and requeueing: see slurm/common.sh.
CONFIG=${CONFIG:-configs/small.yaml}
OUT_DIR=${OUT_DIR:-out/small}
ROOT=${NANOKIMI_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f "$ROOT/slurm/common.sh" ]] || { echo "slurm: $ROOT/slurm/common.sh not found: submit from the repository root or set NANOKIMI_ROOT" >&2; exit 2; }
source "$ROOT/slurm/common.sh"

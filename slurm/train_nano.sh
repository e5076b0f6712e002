#!/usr/bin/env bash
#SBATCH --job-name=kimi-nano
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#
# nano on one GPU. Submit from the repository root; arguments are trainer overrides:
#   sbatch slurm/train_nano.sh --train.max_steps=2000
#   CONFIG=configs/debug.yaml OUT_DIR=out/try EXTRA="--parallel.ep=2" sbatch slurm/train_nano.sh
# On a node without GPUs (no GRES), override the request on the command line, which beats #SBATCH
# lines; on SLURM 22.05 `--gpus-per-node=0` is accepted and schedules (and sets NPROC to 2 CPU
# processes with gloo); --cpus-per-task must also fit the node:
#   sbatch --gpus-per-node=0 --cpus-per-task=2 slurm/train_nano.sh --train.max_steps=5
# Knobs, signals and requeueing: see slurm/common.sh.
CONFIG=${CONFIG:-configs/nano.yaml}
OUT_DIR=${OUT_DIR:-out/nano}
ROOT=${NANOKIMI_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f "$ROOT/slurm/common.sh" ]] || { echo "slurm: $ROOT/slurm/common.sh not found: submit from the repository root or set NANOKIMI_ROOT" >&2; exit 2; }
source "$ROOT/slurm/common.sh"

#!/usr/bin/env bash
# Train on this one node: torchrun --standalone with NPROC processes (one per GPU, or 2 CPU processes
# with gloo when there is no GPU).
#
#   NGPU=8 CONFIG=configs/small.yaml ./launch/train.sh --train.max_steps=1000 --parallel.ep=8
#   ./launch/train.sh --train.max_steps=5            # CPU-only machine: 2 processes, configs/debug.yaml
#   ENGINE=deepspeed ./launch/train.sh --parallel.deepspeed.zero_stage=2 --parallel.ep=2   # DeepSpeed ZeRO-2 + our EP
#
# This is launch/multinode.sh with NNODES=1 and no MASTER_ADDR; its knobs follow.
set -euo pipefail

here=$(dirname "${BASH_SOURCE[0]}")
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set -euo pipefail/{/^set /d; s/^# \{0,1\}//; p}' "${BASH_SOURCE[0]}"
    echo
fi
export NNODES=1
unset MASTER_ADDR
exec "$here/multinode.sh" "$@"

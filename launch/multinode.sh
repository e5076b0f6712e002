#!/usr/bin/env bash
# Launch `kimi.train` on this node under torchrun; run it once on every node of the job.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 ./launch/multinode.sh --train.max_steps=1000   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 ./launch/multinode.sh --train.max_steps=1000   # on node1
#
# Arguments pass through to `torchrun ... -m kimi.train --config "$CONFIG" "$@"`. The nodes meet via
# torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT (the store runs on MASTER_ADDR). With NNODES=1
# and no MASTER_ADDR it runs standalone (a free local port): that is what launch/train.sh does.
# Without GPUs (no nvidia-smi, or it lists none) it starts NPROC CPU processes; the trainer then picks
# gloo and the CPU itself (train.device=auto, parallel.backend=auto), so the same line runs anywhere.
#
# Where the output appears: only global rank 0 prints the training log (and writes metrics.jsonl and
# to MLflow), and c10d, not NODE_RANK, decides which node hosts it: torchrun ignores
# --node_rank with c10d (it says so in a warning), and torch (2.13: dynamic_rendezvous.py sorts the
# nodes) gives rank 0 to the node whose host name (FQDN) sorts first. So NODE_RANK=0 may print nothing
# but torchrun's own lines; each node says so in one line at launch. Only torchrun's static rendezvous
# honours --node_rank, at the cost of c10d's restarts; this script keeps c10d.
#
# Exit code: torchrun's, except 3 when the trainer was preempted (SIGTERM or SIGUSR1, to this script,
# to torchrun or to the workers) and wrote its checkpoint: a requeue policy can key on 3 (see
# run_torchrun in launch/torchrun.sh; torchrun itself would report 1).
#
# Knobs (environment variables, default in brackets):
#   CONFIG       YAML config                                        [configs/debug.yaml]
#   ENGINE       fsdp2 or deepspeed: --parallel.engine=$ENGINE      [the config's; fsdp2 by default]
#                (docs/training.md "Engines"; a --parallel.engine=... argument after it wins)
#   NGPU         GPUs to use per node                               [all that nvidia-smi lists]
#   NPROC        processes per node                                 [NGPU; 2 without GPUs]
#   NNODES       nodes in the job                                   [1]
#   NODE_RANK    this node's index, 0..NNODES-1                     [0]
#   MASTER_ADDR  host of the rendezvous store (node 0)              [standalone if NNODES=1, else required]
#   MASTER_PORT  its port                                           [29500]
#   RDZV_ID      rendezvous id, the same on every node of one job   [nanokimi-$MASTER_PORT]
#   MAX_RESTARTS torchrun --max-restarts: times the agent restarts failed workers, which resume
#                from the latest checkpoint                          [0]
#   TORCH_DISABLE_SHARE_RDZV_TCP_STORE  torch's switch: 1 gives each restart round a fresh store [1]
#                (with torch's default, 0, the rounds share one and a restart on several nodes may
#                not find its peers; kimi/parallel/mesh.py round_store)
#   OMP_NUM_THREADS  threads per process                            [CPUs on this node / NPROC, at least 1]
#   MODULE       Python module to run                               [kimi.train]
#   TORCHRUN     the launcher command                               [see below]
#   PYTHON       run `$PYTHON -m torch.distributed.run`             [unset]
#   VENV         the project's virtual environment                  [.venv]
#                Without TORCHRUN or PYTHON: $VENV/bin/torchrun unless another virtual environment is
#                active, else torchrun from PATH; so .venv need not be activated (launch/torchrun.sh).
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set -euo pipefail/{/^set /d; s/^# \{0,1\}//; p}' "${BASH_SOURCE[0]}"
    exit 0
fi

# GPUs this node can use: CUDA_VISIBLE_DEVICES if set (empty: none), else what nvidia-smi lists.
gpus_here() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . || true
    elif command -v nvidia-smi >/dev/null 2>&1; then
        { nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

CONFIG=${CONFIG:-configs/debug.yaml}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-nanokimi-$MASTER_PORT}
MODULE=${MODULE:-kimi.train}
MAX_RESTARTS=${MAX_RESTARTS:-0}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/torchrun.sh
source "$root/launch/torchrun.sh"
find_torchrun "$root" || exit 2

found=$(gpus_here)
if [[ "$found" -gt 0 ]]; then
    NGPU=${NGPU:-$found}
    NPROC=${NPROC:-$NGPU}
else
    NPROC=${NPROC:-2}
    echo "launch: no GPU on $(hostname -s): $NPROC CPU processes (gloo)" >&2
fi
threads=$(( $(nproc) / NPROC ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}

if [[ ! -f "$CONFIG" ]]; then
    echo "launch: CONFIG=$CONFIG does not exist (run from the repository root; configs are in configs/)" >&2
    exit 2
fi

engine=()
if [[ -n "${ENGINE:-}" ]]; then
    case "$ENGINE" in
        fsdp2 | deepspeed) engine=(--parallel.engine="$ENGINE") ;;
        *) echo "launch: ENGINE=$ENGINE is not one of fsdp2, deepspeed" >&2; exit 2 ;;
    esac
fi

if [[ "$NNODES" == 1 && -z "${MASTER_ADDR:-}" ]]; then
    rdzv=(--standalone)
else
    : "${MASTER_ADDR:?set MASTER_ADDR (the host of node 0) when NNODES > 1}"
    # --node_rank only orders the log prefixes: c10d assigns the ranks itself (see the header).
    rdzv=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --rdzv_id="$RDZV_ID" --rdzv_backend=c10d
        --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT")
    echo "launch: node $NODE_RANK of $NNODES ($(hostname -f 2>/dev/null || hostname)): the training log appears" \
        "on the node that c10d makes rank 0, the one whose host name sorts first, not necessarily NODE_RANK=0" >&2
fi
cmd=("${TORCHRUN_CMD[@]}" "${rdzv[@]}" --nproc_per_node="$NPROC" --max-restarts="$MAX_RESTARTS" -m "$MODULE" --config "$CONFIG" ${engine[@]+"${engine[@]}"} "$@")
echo "+ ${cmd[*]}" >&2
run_torchrun "${cmd[@]}"

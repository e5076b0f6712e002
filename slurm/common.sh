# The body of slurm/train_*.sh (sourced by them, not run): one torchrun per node under srun, c10d
# rendezvous on the head node, checkpoint-and-requeue on a preemption signal.
#
# Knobs (environment variables at `sbatch` time; sbatch exports the submitting shell's environment):
#   CONFIG, OUT_DIR     set by the train_*.sh that sources this
#   EXTRA               more --section.key=value overrides, split on spaces [none]
#   ENGINE              fsdp2 or deepspeed (--parallel.engine=$ENGINE) [the config's; fsdp2 by default]
#   GPUS_PER_NODE       GPUs per node                  [from --gpus-per-node; else nvidia-smi; 0 = CPU]
#   NPROC               processes per node             [GPUS_PER_NODE; 2 on CPU-only nodes]
#   OMP_NUM_THREADS     threads per process            [cpus-per-task / NPROC, at least 1]
#   PYTHON              run `$PYTHON -m torch.distributed.run`  [see launch/torchrun.sh: TORCHRUN,
#                       PYTHON, else $VENV/bin/torchrun (.venv) unless a venv is active, else PATH]
#   MODULE              module to run                  [kimi.train]
#   MASTER_PORT         rendezvous port                [20000 + job id % 20000]
#   REQUEUE_EXIT_CODE   the trainer's "checkpoint written, requeue me" exit code [3]
#   SHUTDOWN_TIMEOUT    seconds torchrun lets workers finish after TERM before SIGKILL [90]
#   MAX_RESTARTS        torchrun --max-restarts: times each agent restarts failed workers, which
#                       resume from the latest checkpoint [0]
#   MAX_REQUEUES        times a crashed job (srun failed without a checkpoint-and-exit) is requeued to
#                       resume from the latest checkpoint [2] (see "A crash" below)
#
# How a preemption travels. `--signal=B:USR1@120` sends USR1 to this batch shell only, 120 s before
# the time limit (test it with `scancel --signal=USR1 --batch JOBID`). The trap below turns it into
# `scancel --signal=TERM $SLURM_JOB_ID`, which slurmstepd delivers to every process of every step
# (torchrun and all its workers) without killing anything; slurmstepd logs that as
# "*** STEP N.0 ... CANCELLED ***", but the step runs on. Why not the obvious ways:
#   - `kill -TERM <srun>`: srun answers TERM with "forcing job termination", i.e. SIGKILL to the tasks.
#   - USR1 to the step: a torchrun without --signals-to-handle (older torch) dies of USR1 and orphans
#     its workers. (Where torchrun has it, PET_SIGNALS_TO_HANDLE below makes it treat USR1 like TERM,
#     in case someone uses --signal=USR1@120 without B:.)
# torchrun handles TERM in every version: it passes it on to its workers, gives them SHUTDOWN_TIMEOUT
# seconds, then SIGKILLs. The trainer, on TERM, finishes its step, writes a checkpoint and exits with
# REQUEUE_EXIT_CODE. torchrun reports any worker failure as exit code 1, so the code does not reach
# this shell through torchrun: a trainer that exits REQUEUE_EXIT_CODE also writes
# OUT_DIR/.requeue-$SLURM_JOB_ID (KIMI_REQUEUE_FILE, on the storage all nodes share), and "saved" is:
# srun returned REQUEUE_EXIT_CODE, or it failed and that file exists. A saved job is requeued
# (`scontrol requeue`, exit 0) unless TERM reached this shell; a trainer that dies without saving is
# not requeued in a loop. The requeued job keeps its id (so MASTER_PORT and the rendezvous id), appends
# to the same slurm-%j.out, starts after AuthInfo's cred_expire (120 s by default) and the trainer
# resumes from OUT_DIR/checkpoints/latest.
# A crash: srun fails and no trainer saved (a rank SIGKILLed or OOM-killed, a node fault, a hung rank's
# timeout, torchrun's restarts used up). The job is requeued, at most MAX_REQUEUES times per job id (counted
# in OUT_DIR/.crashes-$SLURM_JOB_ID; preemption requeues do not count), and resumes from
# OUT_DIR/checkpoints/latest. Not when the trainer stopped on an error a restart would repeat (bad config or
# data, exit 2; NaN, exit 4): it names OUT_DIR/.fatal-$SLURM_JOB_ID (KIMI_FATAL_FILE) then, and the job
# fails at once.
# TERM means slurm is ending the job (`scancel JOBID`, the time limit itself, preemption): slurm
# sends it to the steps and to this shell at once. The trainer still saves, but this shell does not
# requeue: `scontrol requeue` would bring a cancelled job back to life (seen on 22.05). It exits
# REQUEUE_EXIT_CODE then, for a requeue policy outside the job to key on.
set -euo pipefail

: "${SLURM_JOB_ID:?submit this with sbatch (or run it inside an allocation)}"
: "${CONFIG:?}" "${OUT_DIR:?}"
EXTRA=${EXTRA:-}
MODULE=${MODULE:-kimi.train}
REQUEUE_EXIT_CODE=${REQUEUE_EXIT_CODE:-3}
MAX_RESTARTS=${MAX_RESTARTS:-0}
MAX_REQUEUES=${MAX_REQUEUES:-2}
# torchrun's c10d rendezvous keeps one store for the workers of every round and counts restarts per node;
# with it off, each round gets a fresh store (kimi/parallel/mesh.py round_store says why).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-90}
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# --gpus-per-node=8 or =a100:8 -> 8; no GRES request -> ask nvidia-smi on this (head) node.
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    if [[ -n "${SLURM_GPUS_PER_NODE:-}" ]]; then
        GPUS_PER_NODE=${SLURM_GPUS_PER_NODE##*:}
    elif command -v nvidia-smi >/dev/null 2>&1; then
        GPUS_PER_NODE=$({ nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU ' || true)
    else
        GPUS_PER_NODE=0
    fi
fi
if [[ "$GPUS_PER_NODE" -gt 0 ]]; then
    NPROC=${NPROC:-$GPUS_PER_NODE}
else
    NPROC=${NPROC:-2}  # CPU-only node: the trainer picks gloo and the CPU (device/backend "auto")
fi
cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / NPROC > 0 ? cpus / NPROC : 1))}

if [[ ! -f "$CONFIG" ]]; then
    echo "slurm: CONFIG=$CONFIG not found from $PWD (submit from the repository root)" >&2
    exit 2
fi
# shellcheck source=launch/torchrun.sh
source "$ROOT/launch/torchrun.sh"
find_torchrun "$ROOT" || exit 2
read -r -a extra <<<"$EXTRA"
if [[ -n "${ENGINE:-}" ]]; then
    case "$ENGINE" in
        fsdp2 | deepspeed) extra=(--parallel.engine="$ENGINE" ${extra[@]+"${extra[@]}"}) ;;
        *) echo "slurm: ENGINE=$ENGINE is not one of fsdp2, deepspeed" >&2; exit 2 ;;
    esac
fi
# srun in 22.05 does not inherit --cpus-per-task from sbatch: pass it, or all workers share one CPU.
cmd=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK}
    "${TORCHRUN_CMD[@]}" --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$NPROC" --max-restarts="$MAX_RESTARTS"
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT"
    -m "$MODULE" --config "$CONFIG" --train.out_dir="$OUT_DIR" "${extra[@]}" "$@")

mkdir -p "$OUT_DIR"
export KIMI_REQUEUE_FILE=$OUT_DIR/.requeue-$SLURM_JOB_ID  # the trainer's "saved, requeue me" (see above)
export KIMI_FATAL_FILE=$OUT_DIR/.fatal-$SLURM_JOB_ID      # the trainer's "a restart would fail the same way"
crashes_file=$OUT_DIR/.crashes-$SLURM_JOB_ID             # crash requeues of this job id so far
rm -f "$KIMI_REQUEUE_FILE" "$KIMI_FATAL_FILE"

signals=0 got_term=0
on_signal() {
    echo "slurm: got SIG$1 at $(date +%T): asking every step to checkpoint and stop (SIGTERM)"
    [[ $1 == USR1 ]] || got_term=1
    # After a plain scancel the job is gone already and this fails: the steps have their TERM then.
    if [[ $signals -eq 0 ]]; then scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || true; fi
    signals=$((signals + 1))
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

echo "slurm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s) [$SLURM_JOB_NODELIST]," \
    "head $MASTER_ADDR:$MASTER_PORT, $NPROC process(es)/node, OMP_NUM_THREADS=$OMP_NUM_THREADS"
echo "+ ${cmd[*]}"
"${cmd[@]}" &
srun_pid=$!
# `wait` returns early (status > 128) whenever a trap runs; wait again until srun itself has ended.
while :; do
    seen=$signals
    rc=0
    wait "$srun_pid" || rc=$?
    [[ $signals -ne $seen ]] || break
done
echo "slurm: srun exited with $rc after $signals signal(s)"

saved=""
if [[ $rc -eq $REQUEUE_EXIT_CODE || ($rc -ne 0 && -f "$KIMI_REQUEUE_FILE") ]]; then
    saved=$(cat "$KIMI_REQUEUE_FILE" 2>/dev/null || echo "exit code $rc")
    rc=$REQUEUE_EXIT_CODE  # torchrun turned the trainer's REQUEUE_EXIT_CODE into 1; the file tells
fi
rm -f "$KIMI_REQUEUE_FILE"
if [[ -n $saved && $got_term -eq 0 ]]; then
    echo "slurm: checkpoint written ($saved); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
if [[ $rc -ne 0 && -z $saved && $got_term -eq 0 ]]; then
    crashes=$(cat "$crashes_file" 2>/dev/null || echo 0)
    if [[ -f "$KIMI_FATAL_FILE" ]]; then
        echo "slurm: not requeued: the trainer stopped on an error a restart would repeat ($(cat "$KIMI_FATAL_FILE"))"
    elif [[ $crashes -lt $MAX_REQUEUES ]]; then
        echo $((crashes + 1)) >"$crashes_file"
        echo "slurm: srun failed with $rc and no checkpoint-and-exit (a crash); requeueing job $SLURM_JOB_ID" \
            "(crash requeue $((crashes + 1)) of MAX_REQUEUES=$MAX_REQUEUES): it resumes from $OUT_DIR/checkpoints/latest"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    else
        echo "slurm: not requeued: $crashes crash requeue(s) used of MAX_REQUEUES=$MAX_REQUEUES"
    fi
fi
rm -f "$KIMI_FATAL_FILE"
echo "slurm: done, exit code $rc"
exit "$rc"

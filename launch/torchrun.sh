# Sourced by launch/multinode.sh and slurm/common.sh: `find_torchrun REPO_ROOT` puts the launcher
# command into the array TORCHRUN_CMD, so that ./launch/train.sh works without activating .venv first.
#   TORCHRUN  the launcher command (split on spaces), as given
#   PYTHON    `$PYTHON -m torch.distributed.run`
#   VENV      the project's virtual environment [REPO_ROOT/.venv, the one launch/env.sh creates]
# Otherwise: $VENV/bin/torchrun when it exists and no other virtual environment is active (its bin/
# goes first on PATH, as activating it would do), else torchrun from PATH, else one line saying so.
find_torchrun() {
    local venv=${VENV:-.venv}
    [[ $venv == /* ]] || venv=$1/$venv
    if [[ -n "${TORCHRUN:-}" ]]; then
        read -r -a TORCHRUN_CMD <<<"$TORCHRUN"
    elif [[ -n "${PYTHON:-}" ]]; then
        read -r -a TORCHRUN_CMD <<<"$PYTHON -m torch.distributed.run"
    elif [[ -z "${VIRTUAL_ENV:-}" && -x "$venv/bin/torchrun" ]]; then
        export PATH="$venv/bin:$PATH"
        TORCHRUN_CMD=("$venv/bin/torchrun")
    elif command -v torchrun >/dev/null 2>&1; then
        TORCHRUN_CMD=(torchrun)
    else
        echo "launch: torchrun not found: no $venv/bin/torchrun and none on PATH; run ./launch/quickstart.sh" \
            "once (it creates .venv), activate the environment that has torch, or set PYTHON=/path/to/python" >&2
        return 2
    fi
}

# `run_torchrun CMD...` runs the launcher command and returns its exit code, except after a preemption:
# the trainer exits 3 (kimi/trainer/preemption.py REQUEUE_EXIT_CODE) once its checkpoint is written, but
# torchrun reports any worker failure as 1 (and a TERM to torchrun itself as 1 plus a traceback), so a
# requeue policy keyed on 3 would never fire. The workers also write KIMI_REQUEUE_FILE (a fresh path here
# unless set, e.g. on shared storage by slurm/common.sh) when they exit 3; when torchrun failed and the
# file exists, this returns REQUEUE_EXIT_CODE [3]. TERM and HUP to this shell are passed on to torchrun
# (which passes them to its workers), so signalling the launcher is the same as signalling torchrun.
run_torchrun() {
    local own_marker=0 pid rc
    if [[ -z "${KIMI_REQUEUE_FILE:-}" ]]; then
        KIMI_REQUEUE_FILE=$(mktemp -u "${TMPDIR:-/tmp}/kimi-requeue.XXXXXX")
        own_marker=1
    fi
    export KIMI_REQUEUE_FILE
    rm -f "$KIMI_REQUEUE_FILE"
    "$@" &
    pid=$!
    # shellcheck disable=SC2064  # $pid is fixed now
    trap "kill -TERM $pid 2>/dev/null || true" TERM
    # shellcheck disable=SC2064
    trap "kill -HUP $pid 2>/dev/null || true" HUP
    # `wait` returns early (status > 128) whenever a trap runs: wait again until torchrun has ended.
    while :; do
        rc=0
        wait "$pid" || rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    trap - TERM HUP
    if [[ $rc -ne 0 && -f "$KIMI_REQUEUE_FILE" ]]; then
        echo "launch: torchrun exited with $rc after the trainer wrote its checkpoint ($(cat "$KIMI_REQUEUE_FILE"));" \
            "exiting with ${REQUEUE_EXIT_CODE:-3}" >&2
        rc=${REQUEUE_EXIT_CODE:-3}
    fi
    [[ $own_marker -eq 0 ]] || rm -f "$KIMI_REQUEUE_FILE"
    return "$rc"
}

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

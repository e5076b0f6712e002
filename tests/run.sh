#!/usr/bin/env bash
# The test command: create/activate .venv, install the project with its dev extras, run pytest.
# Extra arguments go to pytest (e.g. tests/unit/test_moe.py -k grouped).
# Without a -m of its own it leaves out the tests marked slow (scale, fault and restart runs; the list:
# `python -m pytest -m slow --collect-only -q`), which keeps it near 22 minutes on 2 cores (the slow ones: ~12 more):
#   bash tests/run.sh -m slow     those alone (CI runs them too, after this)
#   bash tests/run.sh -m ""       everything
# The SLURM tests need Debian's slurm-wlm (bash tests/cluster/install.sh, as root); without it they skip.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRAS=dev source launch/env.sh
marker=(-m "not slow")
for arg in "$@"; do
    case $arg in -m | -m* | --markexpr*) marker=() ;; esac
done
echo "+ python -m pytest ${marker[*]:+-m \"${marker[1]}\" }$*"
python -m pytest "${marker[@]}" "$@"

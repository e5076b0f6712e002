#!/usr/bin/env bash
# The test command: create/activate .venv, install the project with its dev extras, run pytest.
# Extra arguments go to pytest (e.g. tests/unit/test_moe.py -k grouped).
# The SLURM tests need Debian's slurm-wlm (bash tests/cluster/install.sh, as root); without it they skip.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRAS=dev source launch/env.sh
echo "+ python -m pytest $*"
python -m pytest "$@"

# Sourced by launch/quickstart.sh and tests/run.sh: create (once) and activate the project's virtual
# environment, then install the project. Torch comes first: the CPU build (torch==2.13.0) unless a GPU
# is visible or torch is already installed, so pip never pulls a multi-GB CUDA build onto a CPU box.
#   VENV=.venv   where the environment lives        EXTRAS=dev   pip extras to install ("" for none)
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS-}
if [ ! -x "$VENV/bin/python" ]; then
    echo "+ python3 -m venv $VENV"
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q --upgrade pip
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "+ pip install torch   (GPU found: the CUDA build)"
        python -m pip install -q torch
    else
        echo "+ pip install torch==2.13.0   (no GPU: the CPU build)"
        python -m pip install -q torch==2.13.0
    fi
fi
echo "+ pip install -e .${EXTRAS:+[$EXTRAS]}"
python -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"

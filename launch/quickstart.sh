#!/usr/bin/env bash
# The main job end to end on one machine (a laptop CPU is fine): install, prepare the Shakespeare
# corpus, train a small Kimi model (MLA + MoE + MuonClip) for ~10 minutes, sample from it, and say how
# to open the run in the MLflow UI.
#
#   ./launch/quickstart.sh                       # defaults below
#   STEPS=100 ./launch/quickstart.sh             # shorter
#   ./launch/quickstart.sh --optim.lr=2e-3       # extra arguments go to python -m kimi.train
#
# Knobs: CONFIG=configs/quickstart.yaml  CORPUS=shakespeare  DATA=data/$CORPUS  OUT=out/quickstart
#        STEPS (default: the config's)  PROMPT="ROMEO:"  VENV=.venv
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set -euo pipefail/{/^set /d; s/^# \{0,1\}//; p}' "$0"
    exit 0
fi
CONFIG=${CONFIG:-configs/quickstart.yaml}
CORPUS=${CORPUS:-shakespeare}
DATA=${DATA:-data/$CORPUS}
OUT=${OUT:-out/quickstart}
PROMPT=${PROMPT:-ROMEO:}
EXTRAS="" source launch/env.sh

run() { echo "+ $*"; "$@"; }
run python -m kimi.prepare --corpus "$CORPUS" --out "$DATA"
steps=()
[ -n "${STEPS:-}" ] && steps=(--max-steps "$STEPS")
run python -m kimi.train --config "$CONFIG" --out-dir "$OUT" --data.dataset="$DATA" "${steps[@]}" "$@"
run python -m kimi.evaluate --checkpoint "$OUT" --data "$DATA"
run python -m kimi.generate --checkpoint "$OUT" --prompt "$PROMPT" --max-new-tokens 120 --seed 1
cat <<MSG

Done. To see the run (loss curves, expert-load heatmap, config, system metrics) in the MLflow UI:
    . $VENV/bin/activate && mlflow ui --backend-store-uri sqlite:///$OUT/mlflow.db --port 5000
and open http://127.0.0.1:5000/#/?workflowType=machine_learning (MLflow's "Model training" view). More samples:
    python -m kimi.generate --checkpoint $OUT --prompt "JULIET:" --stream
MSG

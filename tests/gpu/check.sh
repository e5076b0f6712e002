#!/usr/bin/env bash
# One-GPU check, for the day a GPU is at hand (CI never runs it): bash tests/gpu/check.sh [OUT_JSON]
#
# On the workplace's lent machine (.library/device), fetch the wheels its image lacks here first, then
# send one call that leaves time to rerun it (15 minutes of device time in all, starts included):
#   bash tests/gpu/wheels.sh        # here: pydantic & co. into .whl/ (git-ignored)
#   run(command="SECTIONS_DIR=/tmp/gpu_sections bash tests/gpu/check.sh $OUT/check.json",
#       carry=[".whl"], timeout_s=420)
# $OUT/check.json (every number, each failed section's log tail) and $OUT/logs.tgz (all logs) come back.
#
# Setup: wheels in .whl/ are installed to a private folder put first on PYTHONPATH, and the project is
# installed editable (no deps, no index) if `import kimi.kernels` fails, since kernels/ installs as
# kimi.kernels. Then `preflight` prints torch/triton/CUDA versions and imports every kimi module; with no
# CUDA device, or a module every section needs failing, nothing else runs (each would die the same way);
# another module's failure is reported (rc 2) and the sections run.
# Sections, most wanted first, each timed, each under its own timeout and the whole under BUDGET_S
# (default 300 s); a section that fails or times out is recorded (rc, seconds, the tail of its log) and
# the next one runs. All numbers end up in one JSON (default out/gpu_check/check.json):
#   train_nano                 bf16 training, a few hundred steps: median tokens/s and MFU
#   throughput_8 / _32         python -m kimi.bench throughput at nano 8 x 256 and 32 x 256 (issue 19's
#                              MFU pair against the nanoGPT-equivalent; measured bf16 peak + datasheet MFU)
#   ns                         Muon's Newton-Schulz alone in bf16 on nano's matrices: ms and TFLOP/s per method
#   grouped_mm                 grouped_mm in bf16 against the per-expert loop: max error and ms each
#   kernel_tests / kernels     pytest tests/unit/test_kernels.py and python -m kimi.bench kernels
#   train_small                bf16 training of small, a hundred steps
#   memory                     python -m kimi.bench memory: KV cache 1k-32k MLA vs MHA, cached generation
#   compile                    nano with torch.compile: tokens/s against eager
#   fused_elementwise          nano with only the elementwise chains compiled (train.fused_elementwise): its
#                              Triton kernels' first run, tokens/s against eager and against compile
# Written without a GPU to run it on (none was lent to the sessions that wrote it): expect to fix a detail
# the first time. Knobs: PY (python), BUDGET_S, NANO_STEPS, SMALL_STEPS, NANO_CONFIG, SMALL_CONFIG,
# SECTIONS_DIR (per-section logs; default beside OUT_JSON), ONLY (space-separated section names), WHEELS
# (default .whl).
set -euo pipefail

cd "$(dirname "$0")/../.."
PY=${PY:-$(command -v python || command -v python3)}  # the lent machine has only python3
OUT_JSON=${1:-out/gpu_check/check.json}
DIR=${SECTIONS_DIR:-$(dirname "$OUT_JSON")/sections}
BUDGET_S=${BUDGET_S:-300}
NANO_STEPS=${NANO_STEPS:-300}
SMALL_STEPS=${SMALL_STEPS:-100}
NANO_CONFIG=${NANO_CONFIG:-configs/nano.yaml}
SMALL_CONFIG=${SMALL_CONFIG:-configs/small.yaml}
ONLY=${ONLY:-}
WHEELS=${WHEELS:-.whl}
SKIP_ALL=
mkdir -p "$DIR"
rm -rf "$DIR"/*.status "$DIR"/*.json "$DIR"/*.log
START=$SECONDS

# Setup (not timed against BUDGET_S): what the image lacks, then the project itself.
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE=${SITE:-/tmp/kimi_site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    >"$DIR/setup.log" 2>&1 || { echo "setup: installing $WHEELS/ failed:"; tail -5 "$DIR/setup.log"; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import kimi.kernels" >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$DIR/setup.log" 2>&1 ||
    { echo "setup: pip install -e . failed:"; tail -5 "$DIR/setup.log"; }
fi

# section NAME TIMEOUT_S CMD...: run CMD with its output in $DIR/NAME.log, never abort the script.
section() {
  local name=$1 limit=$2
  shift 2
  if [[ -n $ONLY && " $ONLY " != *" $name "* ]]; then
    return 0
  fi
  local left=$((BUDGET_S - (SECONDS - START)))
  if [[ -n $SKIP_ALL ]] || ((left < 10)); then
    local why=${SKIP_ALL:-out of BUDGET_S}
    echo "{\"rc\": null, \"seconds\": 0, \"skipped\": \"$why\"}" >"$DIR/$name.status"
    echo "== $name: skipped ($why)"
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "== $name (timeout ${limit}s)"
  local t0=$SECONDS rc=0
  if declare -F "$1" >/dev/null; then  # a shell function (train_cmd): timeout needs a process
    timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" >"$DIR/$name.log" 2>&1 || rc=$?
  else
    timeout --kill-after=10 "$limit" "$@" >"$DIR/$name.log" 2>&1 || rc=$?
  fi
  echo "{\"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"timeout_s\": $limit}" >"$DIR/$name.status"
  echo "   rc=$rc in $((SECONDS - t0))s"
  return 0
}

train_cmd() {  # train_cmd NAME CONFIG STEPS EXTRA...: bf16 training on toy tokens, metrics to $DIR/NAME-run
  local name=$1 config=$2 steps=$3
  shift 3
  rm -rf "$DIR/$name-run"
  "$PY" -m kimi.train --config "$config" --data.dataset=toy --train.max_steps="$steps" --train.dtype=bf16 \
    --train.eval_interval=0 --train.log_interval=10 --train.ckpt_interval=0 --train.keep_last=1 \
    --logging.mlflow=false --train.out_dir="$DIR/$name-run" "$@"
}

export -f train_cmd
export PY DIR
nvidia-smi >"$DIR/nvidia-smi.log" 2>&1 || true

section preflight 60 "$PY" - <<'PYEOF'
import importlib, pkgutil, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
import kimi
bad = []
for m in pkgutil.walk_packages(kimi.__path__, "kimi."):
    if m.name.endswith(".__main__"):  # importing one runs its CLI
        continue
    try:
        importlib.import_module(m.name)
    except Exception as e:  # every module, so one run names all that break
        bad.append(f"{m.name}: {type(e).__name__}: {e}")
print("\n".join(bad) or "every kimi module imports")
if not torch.cuda.is_available():
    sys.exit("preflight: torch sees no CUDA device; this script is for a GPU machine")
p = torch.cuda.get_device_properties(0)
print(f"device {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
# what every section needs: stop here if one of these broke; another module's failure is reported (rc 2)
# and the sections still run
core = ("kimi.train", "kimi.bench.throughput", "kimi.model.", "kimi.optim.", "kimi.kernels.")
sys.exit(1 if any(b.startswith(core) for b in bad) else 2 if bad else 0)
PYEOF
if ! grep -qE '"rc": (0|2),' "$DIR/preflight.status" 2>/dev/null && [[ -z $ONLY || " $ONLY " == *" preflight "* ]]; then
  echo "preflight failed (log below); no other section runs:"
  tail -20 "$DIR/preflight.log"
  SKIP_ALL="preflight failed"  # every later section is recorded as skipped
fi
section train_nano 90 train_cmd train_nano "$NANO_CONFIG" "$NANO_STEPS"
section throughput_8 90 "$PY" -m kimi.bench throughput --config "$NANO_CONFIG" --steps 10 \
  --train.global_batch_size=8 --train.micro_batch_size=8 --json "$DIR/throughput_8.json"
section throughput_32 90 "$PY" -m kimi.bench throughput --config "$NANO_CONFIG" --steps 10 \
  --train.global_batch_size=32 --train.micro_batch_size=32 --json "$DIR/throughput_32.json"
section ns 60 "$PY" -m kimi.bench ns --config "$NANO_CONFIG" --rounds 3 --json "$DIR/ns.json"
section grouped_mm 60 "$PY" - "$DIR/grouped_mm.json" <<'PYEOF'
import json, sys, time
import torch
from kimi.model.moe import grouped_swiglu, looped_swiglu
torch.manual_seed(0)
E, D, F, N = 8, 768, 416, 16384
dev, dt = "cuda", torch.bfloat16
x = torch.randn(N, D, device=dev, dtype=dt)
w1, w3 = (torch.randn(E, F, D, device=dev, dtype=dt) * 0.02 for _ in range(2))
w2 = torch.randn(E, D, F, device=dev, dtype=dt) * 0.02
counts = torch.bincount(torch.randint(0, E, (N,), device=dev), minlength=E)
counts[3] = 0  # an empty expert, as in training
counts[0] += N - counts.sum()
out = {}
for name, fn in (("grouped", grouped_swiglu), ("loop", looped_swiglu)):
    y = fn(x, w1, w3, w2, counts); torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        y = fn(x, w1, w3, w2, counts)
    torch.cuda.synchronize()
    out[f"{name}_ms"] = 1000 * (time.perf_counter() - t0) / 20
    out[name] = y.float()
g, l = out.pop("grouped"), out.pop("loop")
err = ((g - l).abs().max() / l.abs().max()).item()  # bf16 both ways, different summation order
out["max_rel_diff"] = err
json.dump(out, open(sys.argv[1], "w"))
print(out)
assert err < 5e-2, f"grouped_mm differs from the loop by {err}"
PYEOF
section kernel_tests 90 "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_kernels.py
section kernels 60 "$PY" -m kimi.bench kernels
section train_small 90 train_cmd train_small "$SMALL_CONFIG" "$SMALL_STEPS" \
  --train.global_batch_size=16 --train.micro_batch_size=16
section memory 60 "$PY" -m kimi.bench memory --config "$NANO_CONFIG" --json "$DIR/memory.json"
section compile 120 train_cmd compile "$NANO_CONFIG" 100 --train.compile=true
section fused_elementwise 120 train_cmd fused_elementwise "$NANO_CONFIG" 100 --train.fused_elementwise=true

# Assemble: each section's status, its JSON (if it wrote one), training medians, the tail of failed logs.
"$PY" - "$DIR" "$OUT_JSON" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
d, out = Path(sys.argv[1]), {}
for st in sorted(d.glob("*.status")):
    name = st.stem
    sec = json.loads(st.read_text())
    if (d / f"{name}.json").exists():
        sec["result"] = json.loads((d / f"{name}.json").read_text())
    rows = [json.loads(l) for l in (d / f"{name}-run" / "metrics.jsonl").read_text().splitlines()] \
        if (d / f"{name}-run" / "metrics.jsonl").exists() else []
    rows = rows[2:] or rows  # warm-up (and compilation) steps excluded
    for key in ("tokens_per_s", "mfu"):  # mfu only where runtime.py knows the card's datasheet peak
        vals = [r[key] for r in rows if key in r]
        if vals:
            sec[key] = statistics.median(vals)
    if rows:
        sec["final_loss"] = rows[-1]["loss"]
    if sec.get("rc") not in (0, None) and (d / f"{name}.log").exists():
        sec["log_tail"] = (d / f"{name}.log").read_text()[-1500:]
    out[name] = sec
out["ok"] = all(s.get("rc") == 0 for s in out.values() if isinstance(s, dict))
smi = d / "nvidia-smi.log"
out["nvidia_smi"] = smi.read_text()[:1500] if smi.exists() else None
Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
print(json.dumps({k: {kk: v.get(kk) for kk in ("rc", "seconds", "tokens_per_s", "mfu")} for k, v in out.items()
                  if isinstance(v, dict)}, indent=1))
print(f"wrote {sys.argv[2]}; all sections ok: {out['ok']}")
PYEOF
# every log, status and metrics file (no checkpoints) in one archive beside the JSON
tar czf "$(dirname "$OUT_JSON")/logs.tgz" -C "$DIR" $(cd "$DIR" && find . -name '*.log' -o -name '*.status' \
  -o -name '*.json' -o -name 'metrics.jsonl' | sort) 2>/dev/null || true
echo "total ${SECONDS}s"

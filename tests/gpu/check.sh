#!/usr/bin/env bash
# One-GPU check, for the day a GPU is at hand (CI never runs it): bash tests/gpu/check.sh [OUT_JSON]
#
# Sections, each timed, each under its own timeout and the whole under BUDGET_S (default 450 s, so the
# script stays under 8 minutes); a section that fails or times out is recorded (rc, seconds, the tail of
# its log) and the next one runs. All numbers end up in one JSON (default out/gpu_check/check.json):
#   train_nano / train_small   bf16 training, a few hundred / a hundred steps: median tokens/s and MFU
#   grouped_mm                 grouped_mm in bf16 against the per-expert loop: max error and ms each
#   compile                    nano with torch.compile: tokens/s against eager
#   throughput                 python -m kimi.bench throughput (measured bf16 peak + datasheet MFU, breakdown)
#   memory                     python -m kimi.bench memory: KV cache 1k-32k MLA vs MHA, cached generation
#   kernel_tests / kernels     pytest tests/unit/test_kernels.py and python -m kimi.bench kernels
# Written without a GPU to run it on (none was lent to the session that wrote it): expect to fix a detail
# the first time. Knobs: PY (python), BUDGET_S, NANO_STEPS, SMALL_STEPS, NANO_CONFIG, SMALL_CONFIG.
set -euo pipefail

cd "$(dirname "$0")/../.."
PY=${PY:-python}
OUT_JSON=${1:-out/gpu_check/check.json}
DIR=$(dirname "$OUT_JSON")/sections
BUDGET_S=${BUDGET_S:-450}
NANO_STEPS=${NANO_STEPS:-300}
SMALL_STEPS=${SMALL_STEPS:-100}
NANO_CONFIG=${NANO_CONFIG:-configs/nano.yaml}
SMALL_CONFIG=${SMALL_CONFIG:-configs/small.yaml}
mkdir -p "$DIR"
rm -f "$DIR"/*.status "$DIR"/*.json
START=$SECONDS

# section NAME TIMEOUT_S CMD...: run CMD with its output in $DIR/NAME.log, never abort the script.
section() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - START)))
  if ((left < 10)); then
    echo "{\"rc\": null, \"seconds\": 0, \"skipped\": \"out of BUDGET_S\"}" >"$DIR/$name.status"
    echo "== $name: skipped (budget spent)"
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
section train_nano 120 train_cmd train_nano "$NANO_CONFIG" "$NANO_STEPS"
section train_small 150 train_cmd train_small "$SMALL_CONFIG" "$SMALL_STEPS" \
  --train.global_batch_size=16 --train.micro_batch_size=16
section compile 150 train_cmd compile "$NANO_CONFIG" 100 --train.compile=true
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
section throughput 90 "$PY" -m kimi.bench throughput --config configs/nano.yaml --steps 10 --json "$DIR/throughput.json"
section memory 90 "$PY" -m kimi.bench memory --config configs/nano.yaml --json "$DIR/memory.json"
section kernel_tests 120 "$PY" -m pytest -q tests/unit/test_kernels.py
section kernels 90 "$PY" -m kimi.bench kernels

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
    if rows:
        sec["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in rows)
        sec["mfu"] = statistics.median(r["mfu"] for r in rows)
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
echo "total ${SECONDS}s"

#!/usr/bin/env bash
# prune.round_to 1 vs 8 vs 32 on the ddpm-cifar10-32 architecture (random weights):
# MACs kept and the ONNX Runtime speed-up at batch 16 (and 1) for each, dense timed alongside.
# Usage: bash scripts/round_to_check.sh [RUN_ROOT] [TARGET]  (2 CPU cores: about 8 minutes)
#   TARGET: the pruning target overrides, default "prune.target_macs=0.57" (the paper's cut, whose
#   widths 96/192 are already multiples of 32); e.g. "prune.target_macs=null prune.ratio=0.3" gives
#   odd widths (q/k/v 179) for round_to to act on.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ROOT=${1:-runs/round-to}
TARGET=${2:-prune.target_macs=0.57}
for r in null 8 32; do
  "$PY" -m pipeline.cli configs/demo.yaml \
    model.name=ddpm-cifar10-32 model.init=random device=cpu \
    prune.method=magnitude $TARGET prune.eval_batch=0 prune.round_to=$r \
    export.precisions=[fp32] bench.backends=[onnxruntime] bench.batch_sizes=[1,16] \
    bench.sampler_batch_sizes=[4] bench.sampler_steps=5 bench.repeat=15 bench.sampler_repeat=1 \
    --stages prune,export,bench --run-dir "$ROOT/round-$r"
done
"$PY" - "$ROOT" <<'PYEOF'
import json, sys
print(f"{'round_to':>8} {'params':>8} {'MACs kept':>9} {'batch':>5} {'speed-up':>8} {'MACs red.':>9} {'ratio':>6}")
for r in ("null", "8", "32"):
    base = f"{sys.argv[1]}/round-{r}"
    p = json.load(open(f"{base}/prune/record.json"))["metrics"]
    for s in json.load(open(f"{base}/bench/record.json"))["metrics"]["speedup"]:
        if s["what"] == "unet":
            print(f"{'1' if r == 'null' else r:>8} {p['params_after'] / 1e6:7.2f}M {p['macs_kept']:9.3f} "
                  f"{s['batch']:5d} {s['speedup']:7.2f}x {s['macs_reduction']:8.2f}x "
                  f"{s['speedup_over_macs_reduction']:6.2f}")
PYEOF

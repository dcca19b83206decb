#!/usr/bin/env bash
# Uniform vs hardware-aware pruning under the same measured latency target, on the demo model:
# for each seed, `prune.search=fine` (one ratio for every layer, the mildest that meets the target)
# and `prune.search=latency` (a ratio per resolution level, most Taylor importance kept per measured
# millisecond), each followed by the demo's equal finetune and the quality stage. Prints one row
# per run and the mean +- sd per search: measured speed-up in the search, MACs kept, importance
# kept, Frechet distance (fd_digits) and SSIM vs dense after finetuning.
#
# Usage: bash scripts/latency_allocation_check.sh [SEEDS] [SPEEDUP] [BATCH] [ROOT]
#   defaults: 0,1,2   1.5   16   runs/alloc     (about 4 minutes per run on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SEEDS=${1:-0,1,2}
SPEEDUP=${2:-1.5}
BATCH=${3:-16}
ROOT=${4:-runs/alloc}
began=$(date +%s)
for seed in ${SEEDS//,/ }; do
  for search in fine latency; do
    "$PY" -m pipeline.cli configs/demo.yaml seed="$seed" threads=1 bench.threads=1 \
      prune.target_macs=null prune.target_latency.speedup="$SPEEDUP" prune.target_latency.batch="$BATCH" \
      prune.target_latency.threads=1 prune.search="$search" quality.compare_raw=false \
      --stages prune,finetune,quality --run-dir "$ROOT/$search-seed$seed"
  done
done
"$PY" - "$ROOT" "$SEEDS" "$began" <<'PYEOF'
import json, statistics, sys, time
root, seeds, began = sys.argv[1], sys.argv[2].split(","), float(sys.argv[3])
def rec(run, stage):
    return json.load(open(f"{root}/{run}/{stage}/record.json"))["metrics"]
rows = {}
print(f"{'run':16} {'chosen':24} {'speed-up':>8} {'MACs kept':>9} {'importance':>10} {'FD':>7} {'SSIM':>6}")
for search in ("fine", "latency"):
    for s in seeds:
        run = f"{search}-seed{s}"
        p, q = rec(run, "prune"), rec(run, "quality")
        lat = p["target"]["target_latency"]
        model = q["models"].get("finetuned") or q["models"]["pruned"]
        fd = model[q["frechet_metric"]]
        chosen = ", ".join(f"{k}:{v:g}" for k, v in p["level_ratios"].items()) or f"ratio {p['ratio']:.4g}"
        r = [lat["chosen"]["speedup"], p["macs_kept"], p["importance_kept"], fd, model["ssim_vs_dense"]]
        rows.setdefault(search, []).append(r)
        print(f"{run:16} {chosen:24} {r[0]:7.2f}x {r[1]:9.3f} {r[2]:10.3f} {r[3]:7.1f} {r[4]:6.3f}")
print()
for search, rs in rows.items():
    cols = list(zip(*rs))
    ms = lambda c: f"{statistics.mean(c):.3f} +- {statistics.stdev(c) if len(c) > 1 else 0:.3f}"
    print(f"{search:8} speed-up {ms(cols[0])}, MACs kept {ms(cols[1])}, importance kept {ms(cols[2])}, "
          f"FD {ms(cols[3])}, SSIM {ms(cols[4])}")
print(f"wall time {time.time() - began:.0f} s")
PYEOF

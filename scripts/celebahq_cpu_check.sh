#!/usr/bin/env bash
# The 256-pixel path on CPU: the ddpm-ema-celebahq-256 architecture (random weights) through prune
# (target_macs 0.57), export fp32 + fp16, parity at batch 1, ONNX Runtime bench at batch 1 and the
# report; prints params / MACs before and after, parity errors, sampler PSNR, speed-up and wall time.
# Usage: bash scripts/celebahq_cpu_check.sh [RUN_DIR]
#   PRECISIONS="[fp32]" skips the fp16 export and its parity (about 4 minutes on 2 cores). The fp16
#   graph is traced at a small size and pinned to 256 px (see export/onnx_export.py): fp16 at full
#   size on a CPU took over 20 minutes to trace.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUN=${1:-runs/celebahq-cpu}
began=$(date +%s)
"$PY" -m pipeline.cli configs/demo.yaml \
  model.name=ddpm-ema-celebahq-256 model.init=random device=cpu \
  prune.method=magnitude prune.target_macs=0.57 prune.eval_batch=0 \
  export.precisions=${PRECISIONS:-[fp32,fp16]} export.trace_batch=1 \
  parity.batches=[1] parity.timesteps=[0,500,999] parity.sampler_images=1 parity.sampler_steps=5 \
  parity.min_psnr_fp16=0 \
  bench.backends=[onnxruntime] bench.batch_sizes=[1] bench.sampler_batch_sizes=[1] bench.sampler_steps=5 \
  bench.warmup=1 bench.repeat=5 bench.sampler_repeat=1 \
  --stages prune,export,parity,bench,report --run-dir "$RUN"
"$PY" - "$RUN" "$began" <<'PYEOF'
import json, sys, time
run, began = sys.argv[1], float(sys.argv[2])
rec = lambda s: json.load(open(f"{run}/{s}/record.json"))["metrics"]
p, par, b = rec("prune"), rec("parity"), rec("bench")
print(f"params {p['params_before'] / 1e6:.2f}M -> {p['params_after'] / 1e6:.2f}M, "
      f"MACs {p['macs_before'] / 1e9:.1f}G -> {p['macs_after'] / 1e9:.1f}G (ratio {p['ratio']})")
print(f"parity: fp32 max abs {par['max_abs_error_fp32']:.3g}")
for r in par["results"]:  # the sampler PSNR is ONNX (this precision) against fp32 torch, same noise
    print(f"parity {r['model']} {r['precision']}: max abs {r['max_abs_error']:.3g}, "
          f"sampler PSNR vs fp32 torch {r['sampler_psnr_db']:.1f} dB")
for s in b["speedup"]:
    print(f"ONNX Runtime {s['what']} batch {s['batch']}: {s['speedup']:.2f}x for "
          f"{s['macs_reduction']:.2f}x fewer MACs (ratio {s['speedup_over_macs_reduction']:.2f})")
print(f"wall time {time.time() - began:.0f} s")
PYEOF

#!/usr/bin/env bash
# GPU check for any CUDA machine (under 8 minutes): the GPU-marked tests, then a short bench of
# the ddpm-cifar10-32 architecture (random weights) dense vs pruned to 57% of MACs: torch fp32 and
# fp16, onnxruntime (CUDA provider when onnxruntime-gpu is installed) and TensorRT where installed.
# Usage: bash scripts/gpu_check.sh [RUN_DIR]       (prints the figures; exit non-zero on failure)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RUN=${1:-runs/gpu-check}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
"$PY" -m pytest -m gpu -rs -q tests/test_gpu.py
"$PY" -m pipeline.cli configs/demo.yaml \
  model.name=ddpm-cifar10-32 model.init=random device=cuda \
  prune.method=magnitude prune.target_macs=0.57 \
  export.precisions=[fp32,fp16] build.min_batch=1 build.opt_batch=64 build.max_batch=64 \
  bench.backends=[torch,onnxruntime,tensorrt] bench.batch_sizes=[1,64] bench.sampler_batch_sizes=[64] \
  bench.sampler_steps=20 bench.repeat=30 bench.sampler_repeat=3 \
  --stages prune,export,build,bench --run-dir "$RUN"
"$PY" - "$RUN" <<'PYEOF'
import json, sys
rec = json.load(open(f"{sys.argv[1]}/bench/record.json"))["metrics"]
print("host:", rec["host"])
for row in rec["results"]:
    print(f"{row['backend']:20} {row['what']:8} batch {row['batch']:3} {row['model']:7} "
          f"median {row['median_ms']:9.3f} ms  p95 {row['p95_ms']:9.3f} ms")
for s in rec["speedup"]:
    print(f"speed-up {s['backend']:20} {s['what']:8} batch {s['batch']:3}: {s['speedup']:.2f}x "
          f"(MACs reduction {s['macs_reduction']:.2f}x)")
for name, why in rec["skipped"].items():
    print(f"skipped {name}: {why}")
PYEOF

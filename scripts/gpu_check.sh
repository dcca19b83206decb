#!/usr/bin/env bash
# GPU check for any CUDA host (under 8 minutes on one H100; no network needed): the GPU-marked
# tests, then dense vs pruned (57% of MACs) on the ddpm-cifar10-32 architecture (random weights)
# for every GPU backend present (sampler rows: DDIM 20, DDIM 20 with feature reuse every 3rd step
# through the full and shallow passes/engines, DPM-Solver++ 10): torch fp32 / fp16 / bf16 / fp16+CUDA graphs, ONNX Runtime (its CUDA
# provider; left out when only the CPU onnxruntime is installed) and TensorRT (+CUDA graphs); a summary table; and the
# standard Inception FID path end to end (real weights from $INCEPTION_WEIGHTS when set, else a
# randomly initialised file: figures meaningless, code path real); where TensorRT runs, the
# text-to-image demo (digits-sd) with its three engines at static shapes: each engine's size, device
# memory and workspace, and the whole call on them (the GPU tests build a tiny one static and dynamic
# and compare the TensorRT sampler with ONNX Runtime).
#
# Usage: bash scripts/gpu_check.sh [--no-tensorrt] [RUN_DIR]
# Exit: 0 all passed; 1 a step failed (TensorRT missing counts unless --no-tensorrt); 2 no CUDA device.
# Offline host: carry the small wheels (bash ../shared/tools/gpu-wheels torch-fidelity onnx-graphsurgeon
#   importlib_metadata) and
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NO_TRT=0
RUN=runs/gpu-check
for arg in "$@"; do
  case $arg in
    --no-tensorrt) NO_TRT=1 ;;
    -h|--help) sed -n 2,18p "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg (known: --no-tensorrt)" >&2; exit 2 ;;
    *) RUN=$arg ;;
  esac
done
if ! "$PY" -c "import torch, deploy.runtimes" 2>/dev/null; then
  echo "gpu_check: $PY cannot import torch and this project; install it (pip install -e .) or set PYTHON" >&2
  exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device (torch.cuda.is_available() is False here); run it on a CUDA host" >&2
  exit 2
fi
FAILED=()
step() {  # step NAME COMMAND...: run, remember a failure, go on
  local name=$1; shift
  echo "== $name"
  if ! "$@"; then FAILED+=("$name"); echo "== $name: FAILED" >&2; fi
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" - <<'PYEOF'
import importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
for name in ("onnxruntime", "onnxruntime-gpu", "tensorrt", "polygraphy", "torch-fidelity", "torchvision"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
PYEOF
TRT_REASON=$("$PY" -c "from deploy.tensorrt_backend import unavailable_reason as r; print(r())")
ORT=onnxruntime,
TRT=tensorrt
if [ -n "$TRT_REASON" ]; then
  if [ $NO_TRT = 1 ]; then
    echo "== TensorRT: skipped (--no-tensorrt): $TRT_REASON"
    TRT=
  else
    echo "== TensorRT: FAILED: $TRT_REASON (pass --no-tensorrt to check the rest only)" >&2
    FAILED+=("tensorrt available")
  fi
fi
if ! "$PY" -c "import sys, onnxruntime as o; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
  echo "== ONNX Runtime: CPU provider only here (onnxruntime-gpu not installed): not a GPU backend, left out"
  ORT=
fi
BACKENDS="[torch,$ORT$TRT]"
BACKENDS=${BACKENDS/,]/]}
echo "== backends benchmarked: $BACKENDS"
step "GPU tests" "$PY" -m pytest -m gpu -rs -q -p no:cacheprovider tests/
STAGES=prune,export,build,parity,bench
step "cifar10 architecture: prune, export, build, parity, bench" "$PY" -m pipeline.cli configs/demo.yaml \
  model.name=ddpm-cifar10-32 model.init=random device=cuda \
  prune.method=magnitude prune.target_macs=0.57 prune.eval_batch=0 \
  export.precisions=[fp32,fp16] export.feature_reuse=true build.min_batch=1 build.opt_batch=64 build.max_batch=256 \
  parity.batches=[1,8] parity.min_psnr_fp16=0 \
  bench.backends="$BACKENDS" bench.batch_sizes=[1,64,256] bench.sampler_batch_sizes=[64] \
  bench.variants=[ddim:20,ddim:20:3,dpmsolver++:10] bench.repeat=30 bench.sampler_repeat=3 \
  --stages $STAGES --run-dir "$RUN"
step "summary table" "$PY" - "$RUN" <<'PYEOF'
import json, sys
rec = json.load(open(f"{sys.argv[1]}/bench/record.json"))["metrics"]
ms = {(r["backend"], r["what"], r["variant"], r["batch"], r["model"]): r["median_ms"] for r in rec["results"]}
print(f"{'backend':22} {'what':8} {'sampler':18} {'batch':>5} {'dense ms':>10} {'pruned ms':>10} "
      f"{'speed-up':>9} {'MACs red.':>9} {'ratio':>6}")
for s in rec["speedup"]:
    k = (s["backend"], s["what"], s["variant"], s["batch"])
    print(f"{s['backend']:22} {s['what']:8} {s['variant'] or '-':18} {s['batch']:5d} {ms[k + ('dense',)]:10.3f} "
          f"{ms[k + ('pruned',)]:10.3f} {s['speedup']:8.2f}x {s['macs_reduction']:8.2f}x "
          f"{s['speedup_over_macs_reduction']:6.2f}")
for name, info in rec["backends"].items():
    print(f"{name}: {info['pruned']}")
for name, why in rec["skipped"].items():
    print(f"skipped {name}: {why}")
par = json.load(open(f"{sys.argv[1]}/parity/record.json"))["metrics"]
print(f"parity: fp32 max abs {par['max_abs_error_fp32']:.3g}; all rows {len(par['results'])}")
PYEOF
if [ -n "$TRT" ]; then  # the text-to-image demo's three engines, static shapes, and its whole call on them
  step "text-to-image (digits-sd): prune, finetune, export, build (build.shapes=static), bench" "$PY" -m pipeline.cli \
    configs/demo-sd.yaml device=cuda finetune.steps=100 build.shapes=static build.opt_batch=4 \
    bench.backends="[torch,$ORT$TRT]" bench.batch_sizes=[4] bench.repeat=10 bench.sampler_repeat=3 \
    --stages prune,finetune,export,build,bench --run-dir "$RUN-sd"
  step "text-to-image engines and whole call" "$PY" - "$RUN-sd" <<'PYEOF'
import json, sys
build = json.load(open(f"{sys.argv[1]}/build/record.json"))["metrics"]["engines"]
for key, e in build.items():
    mem = e.get("device_memory_bytes")
    print(f"{key:22} {e['shapes']:8} {e['engine_bytes'] / 2**20:8.2f} MiB engine  "
          f"{'-' if mem is None else f'{mem / 2**20:.2f}'} MiB device memory  "
          f"workspace limit {e['workspace_bytes'] / 2**30:.1f} GiB  opt {e['profile_shapes']}")
bench = json.load(open(f"{sys.argv[1]}/bench/record.json"))["metrics"]
for r in bench["results"]:
    if r.get("what") == "pipeline":
        print(f"whole call {r['backend']:22} batch {r['batch']} {r['model']:7} {r['median_ms']:9.2f} ms  {r.get('components')}")
for name, why in bench.get("skipped", {}).items():
    print(f"skipped {name}: {why}")
PYEOF
fi
WEIGHTS=${INCEPTION_WEIGHTS:-}
if [ -z "$WEIGHTS" ]; then
  WEIGHTS="$RUN/inception-random.pth"
  step "random Inception weights" "$PY" scripts/make_inception_weights.py "$WEIGHTS"
  echo "   (FID below uses random Inception weights: the figures are meaningless, the code path is real)"
fi
step "standard Inception FID, end to end" "$PY" -m pipeline.cli configs/demo.yaml \
  model.name=ddpm-cifar10-32 model.init=random device=cuda \
  prune.method=magnitude prune.target_macs=0.57 prune.eval_batch=0 \
  quality.feature=inception quality.inception_weights="$WEIGHTS" quality.require_fid=true \
  quality.num_samples=64 quality.steps=10 quality.num_reference=256 \
  --stages prune,quality --run-dir "$RUN"
"$PY" -c "import json,sys; q=json.load(open(sys.argv[1]))['metrics']; print('FID', {k: v.get('fid') for k, v in q['models'].items()})" "$RUN/quality/record.json" 2>/dev/null || true
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'gpu_check: FAILED: %s\n' "${FAILED[@]}" >&2
  exit 1
fi
echo "gpu_check: all passed"

#!/usr/bin/env bash
# Serving check on a finished run (default runs/demo), all on localhost:
#  1. `compress-deploy serve` with dynamic batching: load test (8 clients x 32 requests, DDIM 20
#     steps) with every image compared to local sampling; the bad-request list, each followed by a
#     good request; SIGTERM in the middle of a second load test (exit status, answered requests,
#     nothing left running).
#  2. The same load test with --no-dynamic-batching.
#  3. `compress-deploy triton-repo` (Python-backend unet, the variant PyTriton's bundled tritonserver
#     can load), loaded by that binary, one request served.
# A conditional run (its server has a `text_to_image` model) gets prompts: the load tests cycle through
# $PROMPT (default: the prompts of the run's quality or samples stage), and the bad-request list is the
# text-to-image one (empty, over-long prompt, guidance and steps out of range, no prompt).
# Usage: [BACKEND=torch] [PROMPT="a handwritten digit seven"] bash scripts/serve_check.sh [RUN] [CLIENTS] [REQUESTS] [STEPS]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUN=${1:-runs/demo}
CLIENTS=${2:-8}
REQUESTS=${3:-32}
STEPS=${4:-20}
PORT=${PORT:-8310}
BACKEND=${BACKEND:-onnxruntime}  # the UNet backend serve runs in process (onnxruntime | torch | tensorrt)
THREADS=${THREADS:-}             # its CPU threads (serve --threads; default all)
PROMPT=${PROMPT:-}               # a conditional run's load-test prompt (default: the run's prompts)
OUT=$(mktemp -d)
trap '[ -n "${SERVER:-}" ] && kill -TERM "$SERVER" 2>/dev/null; rm -rf "$OUT"' EXIT  # our own server, by its id

start() {  # start serve with extra options; wait until ready
  "$PY" -m pipeline.cli serve "$RUN" --http-port $PORT --grpc-port $((PORT + 1)) --metrics-port $((PORT + 2)) \
    --max-steps 100 --backend "$BACKEND" ${THREADS:+--threads $THREADS} "$@" > "$OUT/server.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 240); do
    curl -sf -o /dev/null localhost:$PORT/v2/health/ready && return 0
    kill -0 $SERVER 2>/dev/null || { cat "$OUT/server.log"; return 1; }
    sleep 0.5
  done
  return 1
}
infer() {  # infer MODEL JSON-INPUTS: print status code and the error, if any
  curl -s -o "$OUT/reply.json" -w "%{http_code}" -X POST localhost:$PORT/v2/models/$1/infer -d "{\"inputs\":[$2]}"
  echo " $(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['error'] if 'error' in r else 'ok: image ' + str(r['outputs'][0]['shape']))" "$OUT/reply.json")"
}
SEED='{"name":"seed","shape":[1,1],"datatype":"INT64","data":[1]}'
steps() { echo "{\"name\":\"steps\",\"shape\":[1,1],\"datatype\":\"INT32\",\"data\":[$1]}"; }
prompt() { echo "{\"name\":\"prompt\",\"shape\":[1,1],\"datatype\":\"BYTES\",\"data\":[\"$1\"]}"; }
guidance() { echo "{\"name\":\"guidance_scale\",\"shape\":[1,1],\"datatype\":\"FP32\",\"data\":[$1]}"; }
LOAD_ARGS=(${PROMPT:+--prompt "$PROMPT"} --run "$RUN")

echo "== serve $RUN ($BACKEND), dynamic batching (max batch 16, max queue delay 2000 us)"
start || exit 1
ENTRY=sampler
curl -sf -o /dev/null localhost:$PORT/v2/models/text_to_image/ready && ENTRY=text_to_image
"$PY" scripts/load_test.py --url 127.0.0.1:$PORT --clients "$CLIENTS" --requests "$REQUESTS" --steps "$STEPS" \
  --verify "$RUN" --backend "$BACKEND" --json "$OUT/batched.json" "${LOAD_ARGS[@]}"
batches() {  # how many requests the entry model got, and in how many model executions
  curl -s localhost:$((PORT + 2))/metrics | python3 -c "
import re, sys
text, model = sys.stdin.read(), sys.argv[1]
get = lambda name: sum(float(v) for v in re.findall(r'^' + name + r'\{model=\"' + model + r'\",version=\"1\"\} (\S+)', text, re.M))
print(f'{model}: {get(\"nv_inference_request_success\"):.0f} requests in {get(\"nv_inference_exec_count\"):.0f} executions')" "$ENTRY"
}
batches
echo "== bad requests (each followed by a good one)"
if [ "$ENTRY" = text_to_image ]; then  # a conditional run
  GOOD="$(prompt "${PROMPT:-a handwritten digit seven}"),$SEED,$(steps 5)"
  LONG=$(printf 'a handwritten digit seven %.0s' $(seq 1 40))
  for bad in "$(prompt ""),$SEED" "$(prompt "$LONG"),$SEED" "$(prompt x),$SEED,$(guidance -1)" \
    "$(prompt x),$SEED,$(steps 0)" "$(prompt x),$SEED,$(steps 101)" "$SEED"; do
    echo "bad:  $(infer text_to_image "$bad")"
    echo "good: $(infer text_to_image "$GOOD")"
  done
else
for bad in \
  '{"name":"seed","shape":[1,1],"datatype":"FP32","data":[1]}' \
  '{"name":"seed","shape":[1,2],"datatype":"INT64","data":[1,2]}' \
  "$SEED,$(steps 0)" "$SEED,$(steps 101)" \
  '{"name":"seed","shape":[1,1],"datatype":"INT64","data":[-5]}' \
  "$(steps 5)"; do
  echo "bad:  $(infer sampler "$bad")"
  echo "good: $(infer sampler "$SEED,$(steps 5)")"
done
echo "bad:  $(infer no-such-model "$SEED")"
echo "good: $(infer sampler "$SEED,$(steps 5)")"
fi
echo "== SIGTERM during a load test"
"$PY" scripts/load_test.py --url 127.0.0.1:$PORT --clients "$CLIENTS" --requests "$REQUESTS" --steps "$STEPS" \
  --json "$OUT/sigterm.json" "${LOAD_ARGS[@]}" > "$OUT/sigterm.txt" 2>&1 &
LOAD=$!
sleep 4
kill -TERM $SERVER
wait $SERVER; echo "serve exit status: $?"
wait $LOAD
head -1 "$OUT/sigterm.txt"
grep -o "error: seed [0-9]*: .*" "$OUT/sigterm.txt" | head -2
pgrep -f "http-port=$PORT" > /dev/null && echo "LEFT RUNNING: tritonserver" || echo "nothing left running"
tail -2 "$OUT/server.log"

echo "== serve $RUN ($BACKEND), no dynamic batching"
start --no-dynamic-batching || exit 1
"$PY" scripts/load_test.py --url 127.0.0.1:$PORT --clients "$CLIENTS" --requests "$REQUESTS" --steps "$STEPS" \
  --json "$OUT/single.json" "${LOAD_ARGS[@]}"
batches
kill -TERM $SERVER; wait $SERVER
"$PY" - "$OUT" <<'PYEOF'
import json, sys
b, s = (json.load(open(f"{sys.argv[1]}/{n}.json")) for n in ("batched", "single"))
print(f"dynamic batching: {b['images_per_s']:.2f} images/s, without: {s['images_per_s']:.2f} images/s "
      f"({b['images_per_s'] / s['images_per_s']:.2f}x); p50 {b['p50_ms']:.0f} vs {s['p50_ms']:.0f} ms")
PYEOF

echo "== triton-repo (Python-backend unet) loaded by PyTriton's bundled tritonserver"
"$PY" -m pipeline.cli triton-repo "$RUN" "$OUT/repo" --unet python
"$PY" -m pipeline.cli triton-repo "$RUN" "$OUT/repo-onnx"
"$PY" - "$OUT" "$PORT" "$ENTRY" "${PROMPT:-a handwritten digit seven}" <<'PYEOF'
import signal, subprocess, sys, time, urllib.request, json
from pathlib import Path
from deploy.triton import (
    find_server, parse_config, python_backend_dir, server_command, server_environment, server_ready)
out, port, entry, prompt = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
for repo in ("repo", "repo-onnx"):
    for model in sorted(p.parent.name for p in (out / repo).glob("*/config.pbtxt")):
        cfg = parse_config((out / repo / model / "config.pbtxt").read_text())
        print(f"{repo}/{model}: parsed ({cfg.platform or cfg.backend}, max_batch_size {cfg.max_batch_size})")
binary, bundled, libs = find_server()
cmd = server_command(binary, out / "repo", python_backend_dir(bundled, out / "backends"), port, port + 1, port + 2)
proc = subprocess.Popen(cmd, env=server_environment(libs), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for _ in range(360):
    if server_ready(port):
        break
    time.sleep(0.5)
body = {"inputs": [{"name": "seed", "shape": [1, 1], "datatype": "INT64", "data": [7]}]}
if entry == "text_to_image":
    body["inputs"].append({"name": "prompt", "shape": [1, 1], "datatype": "BYTES", "data": [prompt]})
req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{entry}/infer", data=json.dumps(body).encode())
reply = json.load(urllib.request.urlopen(req, timeout=300))
print(f"{binary}: served {entry} from the repository, image shape {reply['outputs'][0]['shape']}")
proc.send_signal(signal.SIGTERM)
print("tritonserver exit status", proc.wait(timeout=120))
PYEOF

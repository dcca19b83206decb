#!/usr/bin/env bash
# Kill -9 a run during finetune, during export and during bench, rerun it each time, and compare
# the final artifacts with an uninterrupted run of the same config (sha256 of deterministic files).
# Usage: bash scripts/kill_resume_check.sh [WORK_DIR]        (2 CPU cores: about 6 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/kill-check}
CLI=".venv/bin/compress-deploy"
ARGS=(configs/demo.yaml finetune.steps=200 finetune.checkpoint_every=50 quality.num_samples=32)
rm -rf "$WORK"; mkdir -p "$WORK"

$CLI "${ARGS[@]}" --run-dir "$WORK/ref" > "$WORK/ref.log" 2>&1 || { echo "reference run failed"; exit 1; }

kill_when() {  # kill_when PATTERN: start the run, SIGKILL it once its log shows PATTERN
  $CLI "${ARGS[@]}" --run-dir "$WORK/killed" > "$WORK/killed.log" 2>&1 &
  local pid=$!
  until grep -q "$1" "$WORK/killed.log" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || { echo "run ended before '$1'"; return 1; }
    sleep 0.2
  done
  sleep "${2:-0}"
  kill -9 $pid; wait $pid 2>/dev/null
  echo "killed with SIGKILL at: $1 (+${2:-0}s)"
}

kill_when "finetune\]:  *[3-9][0-9]%" 0
kill_when "\[export\] start" 1
kill_when "\[bench\] start" 2
$CLI "${ARGS[@]}" --run-dir "$WORK/killed" > "$WORK/final.log" 2>&1 || { echo "final rerun failed"; exit 1; }
grep -E "^\[[a-z]+\] (cached|start)|resumed" "$WORK/final.log"
.venv/bin/python scripts/compare_runs.py "$WORK/ref" "$WORK/killed"

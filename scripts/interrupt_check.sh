#!/usr/bin/env bash
# SIGTERM and SIGINT a demo run during prune, finetune and export; each time check the exit code
# (143 / 130), the one-line message naming the stage, that no temporary file or lock is left, then
# rerun; finally compare the deterministic artifacts with an uninterrupted run (sha256).
# Usage: bash scripts/interrupt_check.sh [WORK_DIR]          (2 CPU cores: about 8 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/interrupt-check}
CLI=".venv/bin/compress-deploy"
ARGS=(configs/demo.yaml finetune.steps=200 finetune.checkpoint_every=50 --stages prune,finetune,samples,export)
rm -rf "$WORK"; mkdir -p "$WORK"
$CLI "${ARGS[@]}" --run-dir "$WORK/ref" > "$WORK/ref.log" 2>&1 || { echo "reference run failed"; exit 1; }
FAIL=0
interrupt_when() {  # interrupt_when SIGNAL PATTERN DELAY EXPECTED_CODE STAGE
  $CLI "${ARGS[@]}" --run-dir "$WORK/run" > "$WORK/run.log" 2>&1 &
  local pid=$!
  until grep -q "$2" "$WORK/run.log" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || { echo "run ended before '$2'"; FAIL=1; return; }
    sleep 0.2
  done
  sleep "$3"
  kill -s "$1" $pid; wait $pid; local code=$?
  local last; last=$(tail -n 1 "$WORK/run.log" | tr '\r' '\n' | tail -n 1)  # after progress bars
  local temps; temps=$(find "$WORK/run" -name '*.tmp*' -o -name '.tmp-*' -o -name '.lock' | wc -l)
  echo "$1 at '$2' +$3s: exit $code, temporaries/locks left: $temps, message: $last"
  [ "$code" = "$4" ] || FAIL=1
  [ "$temps" = 0 ] || FAIL=1
  [ "$last" = "interrupted by $1 during the $5 stage; rerun the same command to resume" ] || FAIL=1
}
interrupt_when SIGTERM "Taylor pass: [0-9]" 1 143 prune
interrupt_when SIGINT "finetune\]:  *[3-9][0-9]%" 0 130 finetune
interrupt_when SIGTERM "\[export\] start" 1 143 export
interrupt_when SIGINT "\[export\] dense fp32" 0 130 export
$CLI "${ARGS[@]}" --run-dir "$WORK/run" > "$WORK/final.log" 2>&1 || { echo "final rerun failed"; exit 1; }
grep -E "^\[[a-z]+\] (cached|start)|resumed" "$WORK/final.log"
.venv/bin/python scripts/compare_runs.py "$WORK/ref" "$WORK/run" || FAIL=1
.venv/bin/compress-deploy verify "$WORK/run" | tail -1
exit $FAIL

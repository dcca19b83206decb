#!/usr/bin/env bash
# Disk full for real: the demo run on a small tmpfs fails with one line, leaves no temporary file
# or lock, `verify` passes on what it wrote; moved to a large disk, the same command resumes and
# finishes. Needs root (mount). Usage: bash scripts/disk_full_check.sh [SIZE]   (default 3m)
set -uo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-3m}
SMALL=$(mktemp -d); BIG=$(mktemp -d)
mount -t tmpfs -o size="$SIZE" tmpfs "$SMALL" || { echo "cannot mount a tmpfs (needs root)"; exit 2; }
ARGS=(configs/demo.yaml finetune.steps=200 finetune.checkpoint_every=50 --stages prune,finetune,samples,export)
.venv/bin/compress-deploy "${ARGS[@]}" --run-dir "$SMALL/run" > "$BIG/full.log" 2>&1
echo "on a ${SIZE} tmpfs: exit $?"
grep "^error:" "$BIG/full.log"
echo "temporaries/locks left: $(find "$SMALL/run" -name '*.tmp*' -o -name '.tmp-*' -o -name '.lock' | wc -l)"
.venv/bin/compress-deploy verify "$SMALL/run" | tail -1
cp -a "$SMALL/run" "$BIG/run"; umount "$SMALL"
.venv/bin/compress-deploy "${ARGS[@]}" --run-dir "$BIG/run" > "$BIG/resume.log" 2>&1
echo "moved to a large disk and rerun: exit $?"
grep -E "^\[[a-z]+\] (cached|start)|resumed" "$BIG/resume.log"
.venv/bin/compress-deploy verify "$BIG/run" | tail -1

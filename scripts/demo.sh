#!/usr/bin/env bash
# Install and run the embedded demo offline on CPU: compress-deploy configs/demo.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/compress-deploy configs/demo.yaml "$@"

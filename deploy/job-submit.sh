#!/usr/bin/env bash
# Run splitserve on an existing Ray cluster through Ray's job API. The working directory (this
# checkout, minus .gitignore'd files) is uploaded, so local edits run without rebuilding images.
#
#   RAY_ADDRESS=http://HEAD:8265 deploy/job-submit.sh                      # a benchmark run
#   RAY_ADDRESS=http://HEAD:8265 deploy/job-submit.sh deploy/gpu-4-2p2d.yaml --rate 8
#   RAY_ADDRESS=http://HEAD:8265 SERVE=1 deploy/job-submit.sh deploy/gpu-1p1d.yaml
#
# CONFIG defaults to deploy/local.yaml (CPU, real SmolLM2 weights), which any Ray cluster runs.
# Extra arguments go to `splitserve run` (or `splitserve serve` with SERVE=1).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address, e.g. http://127.0.0.1:8265}"
config="${1:-deploy/local.yaml}"
shift || true
if [[ "${SERVE:-0}" == 1 ]]; then
  # A server runs until stopped: submit without waiting; `ray job stop ID` ends it.
  exec ray job submit --address "$RAY_ADDRESS" --working-dir . --no-wait -- \
    splitserve serve "$config" --host 0.0.0.0 --port "${PORT:-8000}" "$@"
fi
exec ray job submit --address "$RAY_ADDRESS" --working-dir . -- \
  splitserve run "$config" --num-requests "${NUM_REQUESTS:-20}" --rate "${RATE:-2}" \
  --max-output-tokens "${MAX_OUTPUT_TOKENS:-32}" --out /tmp/splitserve-runs/latest "$@"

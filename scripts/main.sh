#!/usr/bin/env bash
# Set up (if needed) and run the main job: the `quick` study preset on the embedded model
# (all six methods, CoLA ID/OOD and MNLI→HANS); the study writes the report and prints where.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export FEWTUNE_DATA_DIR=${FEWTUNE_DATA_DIR:-$(cd .. && pwd)/shared/data}
OUT=${1:-runs/quick}
# --rerun-stale: after an upgrade, runs made by the old version are re-run (the report never mixes them)
fewtune study quick --out "$OUT" --rerun-stale


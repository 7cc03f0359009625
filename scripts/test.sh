#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: unit tests on tiny random models, data tests
# on ../shared/data (or $FEWTUNE_DATA_DIR), integration tests on the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export FEWTUNE_DATA_DIR=${FEWTUNE_DATA_DIR:-$(cd .. && pwd)/shared/data}
exec python -m pytest -q -p no:cacheprovider "$@"

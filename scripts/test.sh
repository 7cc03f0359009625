#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: unit tests on tiny random models, data tests
# on ../shared/data (or $FEWTUNE_DATA_DIR), integration tests on the embedded model.
# One pytest-xdist worker per core, one torch thread each (tests/conftest.py); FEWTUNE_TEST_WORKERS
# sets the number (0: one process). --dist loadgroup keeps the tests marked
# @pytest.mark.xdist_group(name) on one worker (one Ray cluster, one gloo launch at a time).
# Any pytest arguments are passed through, e.g. -m "not slow" (the fast tier: no processes started,
# no embedded model end to end) or -m "not integration".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export FEWTUNE_DATA_DIR=${FEWTUNE_DATA_DIR:-$(cd .. && pwd)/shared/data}
exec python -m pytest -q -p no:cacheprovider -n "${FEWTUNE_TEST_WORKERS:-auto}" --dist loadgroup --durations=15 "$@"

#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: unit tests on tiny random models, data tests
# on ../shared/data (or $FEWTUNE_DATA_DIR), integration tests on the embedded model.
# One pytest-xdist worker per core, one torch thread each (tests/conftest.py); FEWTUNE_TEST_WORKERS
# sets the number (0: one process). --dist loadscope runs each test module on one worker: its
# module-scoped fixtures (a Ray cluster, a study or report built once) are built once, and tests
# that must not run side by side stay in one module (the Ray cluster; the gloo launches, whose
# rendezvous port is fixed).
# Any pytest arguments are passed through, e.g. -m "not slow" (the fast tier: no processes started,
# no embedded model end to end) or -m "not integration".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export FEWTUNE_DATA_DIR=${FEWTUNE_DATA_DIR:-$(cd .. && pwd)/shared/data}
exec python -m pytest -q -p no:cacheprovider -n "${FEWTUNE_TEST_WORKERS:-auto}" --dist loadscope --durations=15 "$@"

#!/usr/bin/env bash
# Rewrite constraints.txt (the lock) from the versions installed in .venv — run it after the suite
# passed on floated versions (`FEWTUNE_FLOAT=1 bash scripts/test.sh`), then commit constraints.txt.
# fewtune itself is left out (it is what is being installed); torch's local label (+cpu) is dropped
# because a constraint with one would only match that build (`torch==2.13.0` matches 2.13.0+cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${LOCK_PYTHON:-.venv/bin/python}
{
  echo "# The lock: the exact versions the test suite passed with (scripts/setup.sh installs with"
  echo "# -c constraints.txt). Made by scripts/lock.sh on $("$PY" -c 'import platform; print(f"Python {platform.python_version()}, {platform.system()} {platform.machine()}")'); \`FEWTUNE_FLOAT=1\` skips it."
  "$PY" -m pip freeze --exclude-editable --exclude fewtune | grep -v '^#' | sed -E 's/^([A-Za-z0-9_.-]+==[^+ ]+)\+[A-Za-z0-9.]+$/\1/'
} > constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)"

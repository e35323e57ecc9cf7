#!/usr/bin/env bash
# Set up .venv and run the default test suite (CPU, a few minutes; slow tests: add `-m slow`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"

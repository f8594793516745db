#!/usr/bin/env bash
# Fresh-machine setup: a virtual environment in .venv with ih_sweep (editable) and its test
# tools, CPU PyTorch pinned by constraints-cpu.txt. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=68" wheel
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[dev]"

#!/usr/bin/env bash
# Fresh-machine setup: a virtual environment in .venv with ih_sweep (editable) and its test
# tools, CPU PyTorch pinned by constraints-cpu.txt. Idempotent.
#
# The editable install is "strict" (links under build/): its folder is an ordinary path
# entry, so Hydra finds the project's launcher plugins (hydra_plugins/) from any working
# directory; rerun this script after adding a module. Packaging warnings are silenced
# (PYTHONWARNINGS), pip's own output is quiet.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PYTHONWARNINGS=ignore
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=68" wheel
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[dev]" \
  --config-settings editable_mode=strict

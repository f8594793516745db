#!/usr/bin/env bash
# Fresh-machine setup: a virtual environment in .venv with ih_sweep (editable) and its test
# tools, CPU PyTorch pinned by constraints-cpu.txt. Idempotent.
#
# The editable install is setuptools' default ("lenient") one, the one users get from
# `pip install -e .`: ih_sweep maps to this checkout, so a new module needs no reinstall, and
# Hydra finds the project's launcher plugins (hydra_plugins/) from any working directory
# (pyproject.toml lists the hydra_plugins namespace for that; tests/test_packaging.py checks
# it). Packaging warnings are silenced (PYTHONWARNINGS), pip's own output is quiet.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PYTHONWARNINGS=ignore
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=68" wheel
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[dev]"

#!/usr/bin/env bash
# The test command: set up, then run the whole suite. Under CI (CI=true) a real single-node
# SLURM cluster is started first and the SLURM tests must run (REQUIRE_SLURM=1); elsewhere
# they skip unless a cluster answers (scripts/slurm_local.sh start). Without arguments (the
# whole suite), the whole suite then runs again on the lowest transformers release
# pyproject.toml allows (scripts/test_lowest_transformers.sh: see there).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${CI:-}" = "true" ]; then
  bash scripts/slurm_local.sh start
  trap 'bash scripts/slurm_local.sh stop >/dev/null 2>&1 || true' EXIT
  export REQUIRE_SLURM=1 SLURM_CONF=${IH_SLURM_DIR:-/tmp/ih_sweep_slurm}/etc/slurm.conf
fi
.venv/bin/python -m pytest "$@"
if [ $# -eq 0 ]; then
  bash scripts/test_lowest_transformers.sh
fi

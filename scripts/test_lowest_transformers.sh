#!/usr/bin/env bash
# The evaluator's tests again on the LOWEST transformers release pyproject.toml allows (the
# main suite runs on the newest one pip resolves): the evaluator's fast path
# (ih_sweep/evaluation/fastpath/) relies on transformers internals, and is on by default exactly
# on pyproject's range (eval_attention.TESTED_TRANSFORMERS), so both ends are tested.
#
# Cheaply: not a second full install but a small venv layered on the project's one. Its
# site-packages come first on sys.path; a .pth file adds the project venv's site-packages
# (with its own .pth files: the editable ih_sweep) after them. pip, run in it, sees the
# project venv's packages as installed and puts only what that transformers release needs
# differently into the small venv (transformers itself, and e.g. an older huggingface_hub
# and tokenizers; ~30 MB, ~20 s). It never touches the project venv (pip leaves packages
# outside the environment it installs into alone). The small venv is kept inside the project
# venv's folder (.venv/lowest-transformers) and reused while the release stays the same.
#
# Runs test_eval_attention.py, test_evaluation.py, test_ablation.py and test_item_numbers.py
# (the evaluator, its fast path, the ablation hooks, the per-item measures) less two tests
# that exercise no version-dependent path the others do not (the CLI sweep writing the
# measure columns, ~10 s; the bf16 near-ties), and three of test_generation_settings.py
# (every generation-config field the release's processors read is classified; a
# generation_config.json routed through generate; sampling-only settings not routed; its
# per-setting cases, 13 s more, passed on 5.0 when this was written). Measured on 2 cores
# shared with other work: 18 s with the install on idle cores, ~50 s at load 3 (pip
# --no-compile: transformers' files are compiled on import only). Environment: IH_VENV (the
# project venv, default .venv), IH_LOWEST_VENV (where the small venv goes). Extra arguments
# go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${IH_VENV:-.venv}
LOW_VENV=${IH_LOWEST_VENV:-$VENV/lowest-transformers}
LOWEST=$(sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
[ -n "$LOWEST" ] || { echo "no transformers>=X,<Y requirement in pyproject.toml" >&2; exit 1; }
base=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# rebuilt when the release or the project venv's packages (their dist-info names) change
stamp="$LOWEST $(ls "$base" | md5sum | cut -c1-32)"
if [ "$(cat "$LOW_VENV/.stamp" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$LOW_VENV"
  "$VENV/bin/python" -m venv --without-pip "$LOW_VENV"
  low=$("$LOW_VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "import site; site.addsitedir('$base')" > "$low/_project_venv.pth"
  PYTHONWARNINGS=ignore "$LOW_VENV/bin/python" -m pip install -q --no-compile \
    "transformers==$LOWEST"
  echo "$stamp" > "$LOW_VENV/.stamp"
fi
"$LOW_VENV/bin/python" - "$LOWEST" <<'EOF'
import sys
import transformers
from packaging.version import Version
if Version(transformers.__version__) != Version(sys.argv[1]):
    sys.exit(f"expected transformers {sys.argv[1]}, got {transformers.__version__}")
print(f"evaluator's tests on the lowest allowed transformers, {transformers.__version__}")
EOF
"$LOW_VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_eval_attention.py tests/test_evaluation.py tests/test_ablation.py \
  tests/test_item_numbers.py \
  --deselect tests/test_item_numbers.py::test_cli_sweep_writes_the_measure_columns \
  --deselect tests/test_item_numbers.py::test_bf16_items_that_flip_with_the_batch_size_are_near_ties \
  tests/test_generation_settings.py::test_every_field_the_library_reads_is_classified \
  tests/test_generation_settings.py::test_generation_config_file_is_read \
  tests/test_generation_settings.py::test_sampling_settings_leave_the_fast_evaluator_on \
  "$@"

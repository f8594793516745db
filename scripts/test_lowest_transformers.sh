#!/usr/bin/env bash
# The evaluator's tests again on the LOWEST transformers release pyproject.toml allows (the
# main suite runs on the newest one pip resolves): the evaluator's fast path
# (ih_sweep/eval_attention.py) relies on transformers internals, and is on by default exactly
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
# (the evaluator and its fast path, the ablation hooks, the per-item measures) and two of
# test_generation_settings.py (every generation-config field the release's logits processors
# read is classified; a generation_config.json routed through generate). Left out, as slow
# and covered by others on the same paths: test_per_item_equality...[last] and
# test_exact_metric_equality ([all] compares with generate too), the wrong-shortcut check
# with 2 workers (its 1-worker variant), the CLI sweep writing the measure columns and the
# bf16 near-ties. About 80 s on 2 cores with the install (pip --no-compile: transformers'
# files are compiled on import only). Environment: IH_VENV (the project venv, default .venv),
# IH_LOWEST_VENV (where the small venv goes). Extra arguments go to pytest.
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
  tests/test_generation_settings.py::test_every_field_the_library_reads_is_classified \
  tests/test_generation_settings.py::test_generation_config_file_is_read \
  --deselect "tests/test_evaluation.py::test_per_item_equality_with_one_at_a_time_generate[last]" \
  --deselect tests/test_evaluation.py::test_exact_metric_equality \
  --deselect "tests/test_evaluation.py::test_a_wrong_shortcut_is_caught_on_the_first_batch[2]" \
  --deselect tests/test_item_numbers.py::test_cli_sweep_writes_the_measure_columns \
  --deselect tests/test_item_numbers.py::test_bf16_items_that_flip_with_the_batch_size_are_near_ties \
  "$@"

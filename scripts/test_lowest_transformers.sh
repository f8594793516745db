#!/usr/bin/env bash
# The whole suite again on the LOWEST transformers release pyproject.toml allows (the main
# pass runs on the newest one pip resolves): the range pyproject.toml allows is the range the
# whole suite passes on (issue 34: under 5.0 Gemma-2 ran under sdpa, which drops its
# attention softcap; only the evaluator's tests ran here then, and did not see it).
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
# Tests that start a subprocess with sys.executable run it in the small venv too (the CLI
# sweeps, the launcher). Environment: IH_VENV (the project venv, default .venv),
# IH_LOWEST_VENV (where the small venv goes). Extra arguments go to pytest (default: the
# whole suite, as scripts/test.sh's first pass).
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
# the console script, run by this venv's python (tests call it next to sys.executable)
sed "1s|.*|#!$(cd "$LOW_VENV" && pwd)/bin/python|" "$VENV/bin/ih-sweep" > "$LOW_VENV/bin/ih-sweep"
chmod +x "$LOW_VENV/bin/ih-sweep"
"$LOW_VENV/bin/python" - "$LOWEST" <<'EOF'
import sys
import transformers
from packaging.version import Version
if Version(transformers.__version__) != Version(sys.argv[1]):
    sys.exit(f"expected transformers {sys.argv[1]}, got {transformers.__version__}")
print(f"the whole suite on the lowest allowed transformers, {transformers.__version__}")
EOF
"$LOW_VENV/bin/python" -m pytest -p no:cacheprovider "$@"

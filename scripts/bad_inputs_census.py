"""Run every bad input the tests know through the real CLI and tabulate what a user sees.

Each bad-input test module under tests/ exposes ``census_cases(tmp) -> [(name, args)]``
(the files a case needs are written under ``tmp``). Every case runs as
``python -m ih_sweep ARGS debug=fast`` (no debug=fast where ARGS choose debug) from a
fresh working folder (bound by file permissions when run as root), and the table records
its exit status, how many lines it wrote to stderr, whether a traceback appeared and the
last stderr line. A case passes when it exits 2 with exactly one stderr line and no
traceback.

    .venv/bin/python scripts/bad_inputs_census.py [--out census.md] [--jobs 2] [--match TEXT]

Exit status 1 when any case does not pass. Not part of the test suite (about 3 s a case).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p for p in (ROOT / "tests").rglob("test_*.py")
                 if "def census_cases" in p.read_text())


def load_cases(tmp: Path) -> list[tuple[str, str, list[str]]]:
    """(module, case name, CLI arguments) of every module's ``census_cases``."""
    sys.path[:0] = [str(ROOT / "tests")]
    cases = []
    for path in MODULES:
        spec = importlib.util.spec_from_file_location(f"census_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        folder = tmp / path.stem
        folder.mkdir()
        for name, args in module.census_cases(folder):
            cases.append((str(path.relative_to(ROOT)), name, list(args)))
    return cases


# as root, a process that file modes bind (util-linux's setpriv dropping the capabilities
# that bypass them), so that the cases of unreadable files are what a user meets
BOUND = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search",
         "--"] if os.geteuid() == 0 and shutil.which("setpriv") else []


def run_case(args: list[str], cwd: Path) -> dict:
    cwd.mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}  # this checkout's code, from any working folder
    env.pop("HYDRA_FULL_ERROR", None)
    # debug=fast last: the case's own order of flags and overrides is kept (a group choice
    # counts wherever it stands on the command line, and the case's values override it);
    # none where the case chooses debug itself
    fast = [] if any(a.startswith("debug=") for a in args) else ["debug=fast"]
    proc = subprocess.run([*BOUND, sys.executable, "-m", "ih_sweep", *args, *fast],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return {"exit": proc.returncode, "lines": len(lines),
            "traceback": "Traceback" in proc.stderr or "Traceback" in proc.stdout,
            "last": lines[-1] if lines else ""}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--match", default="")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "files").mkdir()
        cases = [c for c in load_cases(tmp / "files") if opts.match in c[1]]
        with ThreadPoolExecutor(opts.jobs) as pool:
            outcomes = list(pool.map(lambda ic: run_case(ic[1][2], tmp / "cwd" / str(ic[0])),
                                     enumerate(cases)))
    rows = ["| # | source | case | exit | stderr lines | traceback | what the user reads |",
            "|---|---|---|---|---|---|---|"]
    bad = 0
    for i, ((source, name, _), out) in enumerate(zip(cases, outcomes), 1):
        ok = out["exit"] == 2 and out["lines"] == 1 and not out["traceback"]
        bad += not ok
        last = out["last"].replace("|", "\\|")
        flag = "" if ok else "**FAIL** "
        rows.append(f"| {i} | {Path(source).stem} | `{name}` | {out['exit']} | {out['lines']} "
                    f"| {'yes' if out['traceback'] else 'no'} | {flag}{last} |")
    total = (f"\n{len(cases)} bad inputs: {len(cases) - bad} end in one line with exit 2; "
             f"{bad} do not; {sum(o['traceback'] for o in outcomes)} tracebacks; "
             f"{sum(o['exit'] == 0 for o in outcomes)} accepted (exit 0).")
    text = "\n".join(rows) + "\n" + total + "\n"
    if opts.out:
        opts.out.write_text(text)
    print(text)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

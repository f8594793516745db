"""The README's result table is what its command prints: the command is run as written (its
output folders moved to a temporary place) and every number of the table is compared."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
COMMAND = "ih-sweep -m n_heads=4,8,16 condition=high,low,none"


def _readme_table() -> dict[tuple[str, str], str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Result on the embedded default"):text.index("## Usage")]
    assert f"`.venv/bin/{COMMAND}`" in section
    assert f".venv/bin/{COMMAND}" in text.splitlines()[3]  # the first command of the README
    cells = {}
    for line in section.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if len(parts) == 4 and parts[0].isdigit():
            for condition, cell in zip(("high", "low", "none"), parts[1:]):
                cells[(parts[0], condition)] = cell
    assert len(cells) == 9
    return cells


def _printed_table(stdout: str) -> dict[tuple[str, str], str]:
    """The first table printed (the accuracy table; the near-tie floor and mechanism check
    follow it as tables of their own)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")),
               len(lines))
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in lines[start:end]]
    header, body = rows[0], rows[2:]
    col = {name: i for i, name in enumerate(header)}
    out = {}
    for r in body:
        out[(r[col["N"]], r[col["condition"]])] = \
            f"{r[col['accuracy %']]} {r[col['95% CI']]}"
        if r[col["condition"]] == "high" and r[col["N"]] == "16":
            out[("16", "high vs none")] = (r[col["Δ vs none (pts)"]], r[col["p vs none"]])
    return out


def test_the_readme_table_is_what_its_command_prints(tmp_path):
    readme = _readme_table()
    program = Path(sys.executable).with_name("ih-sweep")
    args = [str(program), *COMMAND.split()[1:], f"hydra.sweep.dir={tmp_path}/sweep",
            f"paths.cache_dir={tmp_path}/cache"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = _printed_table(proc.stdout)
    for (n, condition), cell in readme.items():
        key = ("", "none") if condition == "none" else (n, condition)
        assert printed[key] == cell, (n, condition, printed[key], cell)
    delta, p = printed[("16", "high vs none")]
    text = (ROOT / "README.md").read_text()
    assert re.search(rf"N=16: {re.escape(delta)} points, exact McNemar p = {re.escape(p)}\)",
                     text), (delta, p)

"""The README's result tables are what its command prints and writes: the command is run as
written (its output folders moved to a temporary place); every number of the accuracy table
is compared with the console, and every number of the tables marked ``<!-- summary.md:
<heading> -->`` with the table under that heading in the run's summary.md."""

from __future__ import annotations

import math
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
    section = section[:section.index("<!-- summary.md")]  # the accuracy table only
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


def _rows(lines: list[str], start: int) -> tuple[list[str], dict[tuple[str, str], list[str]]]:
    """The markdown table starting at or after ``lines[start]``: its header and its body
    rows keyed by (N, condition)."""
    i = next(j for j in range(start, len(lines)) if lines[j].startswith("|"))
    table = []
    while i < len(lines) and lines[i].startswith("|"):
        table.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
        i += 1
    header, body = table[0], table[2:]
    at = {name: k for k, name in enumerate(header)}
    return header, {(r[at["N"]], r[at["condition"]]): r for r in body}


def _pinned_tables(readme: str) -> dict[str, tuple[list[str], dict]]:
    lines = readme.splitlines()
    return {m.group(1): _rows(lines, i + 1) for i, line in enumerate(lines)
            if (m := re.fullmatch(r"<!-- summary\.md: (.+) -->", line.strip()))}


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _same_numbers(shown: str, written: str) -> bool:
    """Every number of ``shown`` (the README) equals the one in the same place of
    ``written`` (summary.md) to within one unit of the README's last digit: the last bit
    of a float32 sum may differ between runs, and a rounding may then go the other way."""
    a, b = _NUMBER.findall(shown), _NUMBER.findall(written)
    if len(a) != len(b) or _NUMBER.sub("#", shown) != _NUMBER.sub("#", written):
        return False
    for x, y in zip(a, b):
        mantissa, _, exp = x.partition("e")
        digits = len(mantissa.partition(".")[2])
        unit = 10.0 ** (-digits + (int(exp) if exp else 0))
        if not math.isclose(float(x), float(y), abs_tol=1.01 * unit):
            return False
    return True


def _readme_table_text() -> str:
    """The accuracy table of the README's result section, its lines as they are."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Result on the embedded default"):]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| N |"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return "\n".join(lines[start:end])


def _printed_table(stdout: str) -> dict[tuple[str, str], str]:
    """The first table printed (the N x condition accuracy table), by (N, condition), and
    the printed line of high vs unablated at N=16 as (difference, p)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")),
               len(lines))
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in lines[start:end]]
    out = {}
    for r in rows[2:]:
        for condition, cell in zip(("high", "low", "none"), r[1:]):
            out[(r[0], condition)] = cell
    found = re.search(r"^N=16 high vs unablated: (\S+) points .*?, exact McNemar p = (\S+) ",
                      stdout, re.M)
    assert found, stdout[-3000:]
    out[("16", "high vs none")] = (found[1], found[2])
    return out


def test_the_readme_table_is_what_its_command_prints(tmp_path):
    readme = _readme_table()
    program = Path(sys.executable).with_name("ih-sweep")
    args = [str(program), *COMMAND.split()[1:], f"hydra.sweep.dir={tmp_path}/sweep",
            f"paths.cache_dir={tmp_path}/cache"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _readme_table_text() in proc.stdout  # the README's table is the printed one
    printed = _printed_table(proc.stdout)
    for key, cell in readme.items():
        assert printed[key] == cell, (key, printed[key], cell)
    delta, p = printed[("16", "high vs none")]
    text = (ROOT / "README.md").read_text()
    assert re.search(rf"N=16: {re.escape(delta)} points, exact McNemar p = {re.escape(p)}\)",
                     text), (delta, p)

    # the tables copied from summary.md, and the near-tie claim
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    pinned = _pinned_tables(text)
    assert len(pinned) == 4, list(pinned)
    lines = summary.splitlines()
    for heading, (header, rows) in pinned.items():
        start = next(i for i, line in enumerate(lines) if line.startswith(heading))
        full_header, written = _rows(lines, start + 1)
        assert set(rows) == set(written), (heading, sorted(rows), sorted(written))
        for key, row in rows.items():
            for name, cell in zip(header[2:], row[2:]):
                got = written[key][full_header.index(name)]
                assert _same_numbers(cell, got), (heading, key, name, cell, got)
    import pandas as pd

    near_ties = pd.read_csv(tmp_path / "sweep" / "summary.csv")["n_near_tie"]
    assert (near_ties == 0).all() and len(near_ties) == 7, near_ties.tolist()
    assert "0 in each of the 7 evaluations" in text

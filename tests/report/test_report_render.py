"""The summary's text (ih_sweep/report/cells.py, sections.py, render.py, errors.py): how
cells show numbers, the pandas-written markdown and LaTeX tables, an error as one line."""

from __future__ import annotations

import pandas as pd
import pytest

from ih_sweep.report.cells import (
    draws_text,
    fixed,
    inside,
    interval,
    missing,
    number,
    p_value,
    percent,
    value_ci,
)
from ih_sweep.report.errors import why
from ih_sweep.report.render import latex_table, markdown_table, strata_markdown
from ih_sweep.report.sections import display, shown_rows

NAN = float("nan")


def test_cells_show_numbers_and_leave_missing_values_empty():
    assert missing(None) and missing(NAN) and not missing(0.0) and not missing("x")
    assert percent(0.125) == "12.5" and interval(0.1, 0.2) == "[10.0, 20.0]"
    assert p_value(0.012345) == "0.0123" and number(-1.23456) == "-1.23"
    assert fixed(2.5) == "2.500" and draws_text(1) == "1 draw" and draws_text(3) == "3 draws"
    assert value_ci(0.5, 0.25, 0.75) == "0.500 [0.250, 0.750]" and value_ci(0.5, NAN, 1) == "0.500"
    # one format in a cell: 3 significant digits with their trailing zeros (issue #33)
    assert value_ci(-3.0, -3.15, -2.84) == "-3.00 [-3.15, -2.84]" and number(4.2e-5) == "4.20e-05"
    assert inside(True) == "inside" and inside(False) == "outside"
    for f in (percent, p_value, number, fixed, inside):
        assert f(NAN) == "" and f(None) == ""
    assert interval(0.1, None) == "" and value_ci(NAN, 0, 1) == ""


def test_markdown_and_latex_tables():
    table = pd.DataFrame({"N": ["4", "16"], "condition": ["high", "low"],
                          "accuracy %": ["9.5", "100.0"]})
    assert markdown_table(table).splitlines() == [
        "|   N | condition   |   accuracy % |",
        "|----:|:------------|-------------:|",
        "|   4 | high        |          9.5 |",
        "|  16 | low         |        100.0 |"]
    tex = latex_table(table.assign(condition=["high_1", "50%"]).rename(
        columns={"accuracy %": r"accuracy (\%)"}))
    assert tex == ("\\begin{tabular}{rrr}\n\\toprule\nN & condition & accuracy (\\%) \\\\\n"
                   "\\midrule\n4 & high\\_1 & 9.5 \\\\\n16 & 50\\% & 100.0 \\\\\n"
                   "\\bottomrule\n\\end{tabular}\n")  # cells escaped, headers given in LaTeX


def test_display_applies_a_spec_and_drops_empty_columns():
    df = pd.DataFrame({"condition": ["high", "none"], "n_heads": [4, 0], "x": [0.5, NAN]})
    spec = [("condition", "cond.", lambda r: r.condition),
            ("empty", "empty", lambda r: ""), ("x %", r"x (\%)", lambda r: percent(r.x))]
    assert display(df, spec).to_dict("list") == {"condition": ["high", "none"],
                                                  "empty": ["", ""], "x %": ["50.0", ""]}
    assert list(display(df, spec, latex=True, keep=1).columns) == ["cond.", r"x (\%)"]
    assert shown_rows(df) is df  # not rows of a sweep's summary: every row


def test_strata_markdown_without_strata_says_why():
    assert strata_markdown(None) == []
    lines = strata_markdown(pd.DataFrame())
    assert lines[0] == "## Difficulty strata" and lines[2].startswith("*Left out")


@pytest.mark.parametrize("err, text", [
    (ValueError("bad\nsecond line"), "ValueError: bad"), (KeyError(), "KeyError"),
    (OSError("x" * 400), "OSError: " + "x" * 300)])
def test_an_error_as_one_line(err, text):
    assert why(err) == text


def test_a_figure_title_names_the_weights_not_a_bare_none():
    """quantization=none reads as "no ablation" in a title (``tiny (none)``): the title
    says full-precision weights; a quantization keeps its name."""
    from types import SimpleNamespace

    from ih_sweep.report.plots import short_title

    row = SimpleNamespace(model="tiny", quantization="none", split="generated", babi_task=1,
                          data="babi_generated", metric="contains", scope="last",
                          ablation="zero", group="model=tiny", rank_by="prefix")
    assert short_title(row).startswith("tiny (full-precision weights), bAbI task 1")
    assert "(none)" not in short_title(row)
    assert short_title(SimpleNamespace(**{**vars(row), "quantization": "nf4"})).startswith(
        "tiny (nf4),")


def test_a_stratum_with_one_value_is_a_sentence_not_a_one_column_table():
    """eval.scope=last asks each story's last question only: question_position has one
    value and says so instead of a table of one column (issue #33)."""
    rows = []
    for cond, n in (("none", 0), ("high", 4)):
        for stratum, value in (("support_distance", "1"), ("support_distance", "2"),
                               ("question_position", "4")):
            rows.append({"group": "g", "n_heads": n, "n_heads_share": float("nan"),
                         "condition": cond, "n_draws": 1, "stratum": stratum, "value": value,
                         "order": int(value), "n_items": 10, "n_correct": 9, "accuracy": 0.9,
                         "ci_low": 0.6, "ci_high": 0.98})
    md = "\n".join(strata_markdown(pd.DataFrame(rows)))
    assert "**question_position** (index of the question in its story, 0-based): every item " \
           "has the same value, 4, so it makes no strata." in md
    assert md.count("|   N |") == 1 and "**support_distance**" in md

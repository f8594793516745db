"""The summary's p-values in declared Holm families, and what its random null cannot decide
(issue #30 item 2): each of p vs none, p vs low and p vs random adjusted over its own
p-values of the whole summary (checked against statsmodels directly), shown adjusted and
raw with the family's size in the legend; the null's band at the ceiling or floor and a K
too small to survive the correction said in words, per N. Sweep folders are synthetic job
folders written through the project's records (tests/summary_jobs.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests
from summary_jobs import make_job

from ih_sweep.report.render import console_report
from ih_sweep.report.summarize import summarize

ITEMS = 40


def right_but(wrong: int, items: int = ITEMS) -> np.ndarray:
    """``items`` outcomes, all correct but the first ``wrong``."""
    return np.arange(items) >= wrong


def add_null(root, n: int, wrongs: list[int], model: str = "tiny") -> None:
    """``len(wrongs)`` random draws at N=``n``, draw k wrong on its first ``wrongs[k]``
    items."""
    for k, w in enumerate(wrongs):
        make_job(root, f"{model}-rand{n}-{k}", n, "random", right_but(w), seed=k, model=model)


def md_rows(md: str, heading: str) -> tuple[list[str], list[list[str]]]:
    """Header and body rows of the first markdown table after the line ``heading``."""
    lines = md[md.index(heading + "\n"):].splitlines()[1:]
    start = next(i for i, x in enumerate(lines) if x.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip().strip("|").split("|")])
    return table[0], table[2:]


def statsmodels_holm(p: pd.Series) -> pd.Series:
    """Holm over the non-missing values of ``p``, from statsmodels itself (NaN elsewhere)."""
    out = pd.Series(np.nan, index=p.index)
    kept = p.dropna()
    out[kept.index] = multipletests(kept.to_numpy(), method="holm")[1]
    return out


# --------------------------------------------------------------------------- families
@pytest.fixture
def two_models(tmp_path):
    """Two groups (models ``tiny`` and ``other``), each: ``none``; N=4 with ``high``,
    ``low`` and 9 random draws; N=8 with ``high`` and ``low``, no draws (p vs random
    missing); ``tiny`` also N=16 ``high`` alone (p vs low and vs random missing)."""
    for model, shift in (("tiny", 0), ("other", 3)):
        make_job(tmp_path, f"{model}-none", 0, "none", right_but(0), model=model)
        for n, high, low in ((4, 6 + shift, 1), (8, 14 + shift, 2 + shift)):
            make_job(tmp_path, f"{model}-high{n}", n, "high", right_but(high), model=model)
            make_job(tmp_path, f"{model}-low{n}", n, "low", right_but(low), model=model)
        add_null(tmp_path, 4, [0, 0, 1, 1, 2, 2, 3, 3, 8 + shift], model=model)
    make_job(tmp_path, "tiny-high16", 16, "high", right_but(25))
    return tmp_path


def test_each_family_is_holm_over_its_own_p_values_of_the_whole_summary(two_models):
    df = summarize(two_models)
    assert df.group.nunique() == 2
    tested = df.condition != "random"  # the draws are the null's sample, not hypotheses
    families = ("p_vs_none", "p_vs_low", "p_vs_random")
    pooled = statsmodels_holm(pd.concat([df[c].where(tested) for c in families],
                                        ignore_index=True))  # one family of all three
    sizes = {}
    for i, raw in enumerate(families):
        members = df[raw].where(tested)
        sizes[raw] = int(members.notna().sum())
        want = statsmodels_holm(members)
        got = df[f"{raw}_holm"]
        assert got.isna().equals(want.isna()), raw  # missing p: outside, and stays empty
        np.testing.assert_allclose(got.dropna(), want.dropna(), rtol=1e-12, err_msg=raw)
        # not the two groups apart, not pooled with the other families
        per_group = pd.concat([statsmodels_holm(members[df.group == g])
                               for g in df.group.unique()]).loc[df.index]
        assert not np.allclose(got.dropna(), per_group.dropna()), raw
        in_pooled = pooled.iloc[i * len(df):(i + 1) * len(df)].set_axis(df.index)
        assert not np.allclose(got.dropna(), in_pooled.dropna()), raw
    # 2 groups x (high, low at N=4 and 8) + high N=16; high at N=4, 8 (and 16: no low there);
    # high and low at N=4 (no draws at 8 and 16)
    assert sizes == {"p_vs_none": 9, "p_vs_low": 4, "p_vs_random": 4}
    assert df.loc[df.condition == "random", ["p_vs_none_holm", "p_vs_low_holm",
                                              "p_vs_random_holm"]].isna().all().all()
    written = pd.read_csv(two_models / "summary.csv")
    for column in ("p_vs_low_holm", "p_vs_random_holm", "p_vs_random_holm_min"):
        np.testing.assert_allclose(written[column], df[column].astype(float), rtol=1e-12)

    md = (two_models / "summary.md").read_text()
    assert ("**p vs none (Holm)** over the 9 p vs none of this summary; **p vs low (Holm)** "
            "over the 4 p vs low of this summary; **p vs random (Holm)** over the 4 p vs "
            "random of this summary") in md
    header, rows = md_rows(md, "## model=tiny, quantization=none, data=babi_generated, "
                               "babi_task=1, split=generated, metric=contains, scope=last, "
                               "ablation=zero, rank_by=prefix")
    high4 = dict(zip(header, next(r for r in rows if r[:2] == ["4", "high"])))
    row = df[(df.model == "tiny") & (df.condition == "high") & (df.n_heads == 4)].iloc[0]
    for raw, shown in (("p_vs_none", "p vs none"), ("p_vs_low", "p vs low"),
                       ("p_vs_random", "p vs random")):
        assert high4[shown] == f"{row[raw]:.3g}"  # raw and adjusted side by side
        assert high4[f"{shown} (Holm)"] == f"{row[raw + '_holm']:.3g}"
    tex = (two_models / "summary.tex").read_text()
    assert "$p$ vs low (Holm)" in tex and "$p$ vs random (Holm)" in tex


# --------------------------------------------------------------------------- the ceiling
def test_the_null_at_the_ceiling_or_floor_is_said_exactly_where_its_band_is(tmp_path):
    """K=40 draws at each N (the sentence on K is not what this test reads). N=4: one
    draw below 100%,
    so the band only reaches the ceiling at its top; N=8: every draw at 100% (band
    [100, 100]); N=16: every draw at 0% (band [0, 0])."""
    make_job(tmp_path, "none", 0, "none", right_but(0))
    for n, high in ((4, 3), (8, 10), (16, ITEMS)):
        make_job(tmp_path, f"high{n}", n, "high", right_but(high))
        make_job(tmp_path, f"low{n}", n, "low", right_but(0))
    add_null(tmp_path, 4, [1] + [0] * 39)
    add_null(tmp_path, 8, [0] * 40)
    add_null(tmp_path, 16, [ITEMS] * 40)
    df = summarize(tmp_path)
    carried = df[df.condition.isin(["high", "low"])].set_index(["n_heads", "condition"])
    band = carried[["random_acc_p2_5", "random_acc_p97_5"]]
    assert band.loc[(4, "high")].tolist() == [pytest.approx(1 - 0.025 / ITEMS), 1.0]
    written = pd.read_csv(tmp_path / "summary.csv")
    at = written[written.condition.isin(["high", "low"])].set_index(
        ["n_heads", "condition"]).null_band_at
    assert at.isna()[4].all() and (at[8] == "ceiling").all() and (at[16] == "floor").all()
    assert written.loc[written.condition.isin(["random", "none"]), "null_band_at"].isna().all()

    md = (tmp_path / "summary.md").read_text()
    ceiling = ("the random null cannot separate at N=8: its K=40 draws' band is [100, 100] "
               "(at the ceiling: the draws lose nothing, so it cannot tell a small loss from "
               "a large one)")
    floor = ("the random null cannot separate at N=16: its K=40 draws' band is [0, 0] (at "
             "the floor: the draws lose everything, so no row can fall below them)")
    group = md[:md.index("## Against the random null")]
    assert group.count(f"- {ceiling}.") == 1 and group.count(f"- {floor}.") == 1
    assert "cannot separate at N=4" not in md
    null = md[md.index("## Against the random null"):md.index("### Legend")]
    assert f"- top-N by prefix: {ceiling}." in null and f"- top-N by prefix: {floor}." in null
    assert "**Limits of the random null** (summary.csv `null_band_at`" in md  # the legend
    report = console_report(df, tmp_path)
    assert f"Limits of the random null: {ceiling}." in report
    assert "cannot separate at N=4" not in report


def test_a_null_off_its_bounds_says_nothing(tmp_path):
    """Draws spread below the ceiling and enough of them (K=99 for 2 comparisons: Holm's
    floor 2/100 = 0.02): no sentence, no legend item, empty flags."""
    make_job(tmp_path, "none", 0, "none", right_but(0))
    make_job(tmp_path, "high4", 4, "high", right_but(20))
    make_job(tmp_path, "low4", 4, "low", right_but(0))
    add_null(tmp_path, 4, [k % 4 for k in range(99)])
    df = summarize(tmp_path)
    md = (tmp_path / "summary.md").read_text()
    assert "Limits of the random null" not in md
    assert "Limits of the random null" not in console_report(df, tmp_path)
    high = df[df.condition == "high"].iloc[0]
    assert pd.isna(high.null_band_at) and high.p_vs_random_holm_min == pytest.approx(0.02)
    assert high.p_vs_random_holm == pytest.approx(0.02)  # the floor, reached: 2 x 1/100


# --------------------------------------------------------------------------- K too small
@pytest.mark.parametrize("case", ["K=20, 16 comparisons", "K=19, 2 comparisons",
                                  "K=19, 1 comparison", "K=19 beside K=39"])
def test_a_null_too_small_for_holm_is_said_with_its_numbers(tmp_path, case):
    """Every draw wrong on 1 item (never at the ceiling), ``high`` wrong on 5 (below every
    draw: the smallest p its K allows). Holm's floor is min(1, max(m / (K_max + 1),
    1 / (K + 1))): said in words per N where it is above 0.05, and reached by the adjusted p
    of the smallest raw p."""
    make_job(tmp_path, "none", 0, "none", right_but(0))
    if case == "K=20, 16 comparisons":  # 8 N, high and low each (issue #30's numbers)
        nulls = {n: 20 for n in range(1, 9)}
    elif case == "K=19 beside K=39":
        nulls = {4: 39, 8: 19}
    else:
        nulls = {4: 19}
    for n, k in nulls.items():
        make_job(tmp_path, f"high{n}", n, "high", right_but(5))
        if case != "K=19, 1 comparison":
            make_job(tmp_path, f"low{n}", n, "low", right_but(0))
        add_null(tmp_path, n, [1] * k)
    df = summarize(tmp_path)
    md = (tmp_path / "summary.md").read_text()
    report = console_report(df, tmp_path)
    expected = {
        "K=20, 16 comparisons": {n: "at N={n}, with K=20 draws the smallest p vs random is "
                                    "1/21 = 0.048; Holm over 16 comparisons cannot go below "
                                    "0.76" for n in nulls},
        "K=19, 2 comparisons": {4: "at N={n}, with K=19 draws the smallest p vs random is "
                                   "1/20 = 0.05; Holm over 2 comparisons cannot go below 0.1"},
        "K=19, 1 comparison": {},  # 1/20 = 0.05 itself: it can reach 0.05
        "K=19 beside K=39": {  # 4/40 = 0.1 either way; at N=8 because of the K=39 null
            4: "at N={n}, with K=39 draws the smallest p vs random is 1/40 = 0.025; Holm "
               "over 4 comparisons cannot go below 0.1",
            8: "at N={n}, with K=19 draws the smallest p vs random is 1/20 = 0.05; Holm over "
               "4 comparisons cannot go below 0.1 (the family's largest null has K=39 "
               "draws)"}}[case]
    for n in nulls:
        tail = ", so no p vs random (Holm) at this N can reach 0.05."
        if n in expected:
            sentence = expected[n].format(n=n) + tail
            assert md.count(f"- {sentence}") == 1, sentence
            assert f"Limits of the random null: {sentence}" in report
        else:
            assert f"at N={n}, with" not in md and f"at N={n}, with" not in report
    m = {"K=20, 16 comparisons": 16, "K=19, 2 comparisons": 2, "K=19, 1 comparison": 1,
         "K=19 beside K=39": 4}[case]
    k_max = max(nulls.values())
    floor = df.loc[df.condition == "high"].set_index("n_heads").p_vs_random_holm_min
    for n, k in nulls.items():
        assert floor[n] == pytest.approx(min(1.0, max(m / (k_max + 1), 1 / (k + 1))))
    # the floor is reached by the smallest raw p (high at the largest null)
    best = df[(df.condition == "high") & (df.n_random == k_max)]
    assert best.p_vs_random_holm.min() == pytest.approx(min(1.0, m / (k_max + 1)))
    assert "the random null cannot separate at" not in md  # the draws are off the ceiling

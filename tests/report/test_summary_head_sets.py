"""The summary's head sets (ih_sweep.report.rows.head_set_row, the "Head sets" section) and
the grouping of random nulls by control.match (ih_sweep.report.groups.group_jobs): each
comparison says how much its control's heads write beside the ablated set."""

from __future__ import annotations

import pandas as pd
import pytest

from ih_sweep.report.summarize import summarize
from tests.summary_jobs import edit_record, make_job

SETTINGS = {"model": {"name": "tiny"}, "quantization": {"name": "none"},
            "data": {"name": "babi_generated", "task": 1, "n_stories": 40, "seed": 0},
            "eval": {"metric": "contains", "scope": "last", "max_new_tokens": 3},
            "ablation": {"method": "zero"}, "scoring": {"rank_by": "prefix"}}


def _job(root, name, n, cond, correct, heads, norm, scores, seed=0, match=None):
    settings = dict(SETTINGS)
    if match is not None:
        settings["control"] = {"match": match, "norm_factor": 2.0}
    folder = make_job(root, name, n, cond, correct, seed=seed, settings=settings)
    if heads:
        pd.DataFrame({"layer": [la for la, _ in heads], "head": [h for _, h in heads],
                      "score": scores, "rank_by": "prefix",
                      "output_norm": [norm] * len(heads)}).to_csv(folder / "heads.csv",
                                                                  index=False)
        edit_record(folder, {"heads": [list(h) for h in heads], "output_norm_mean": norm})
    return folder


def _sweep(tmp_path, matches=("layer_norm",)):
    n_items = 40
    _job(tmp_path, "none", 0, "none", [1] * n_items, [], None, [])
    _job(tmp_path, "high", 2, "high", [1] * 10 + [0] * 30, [(1, 0), (1, 1)], 8.0, [0.8, 0.6])
    _job(tmp_path, "low", 2, "low", [1] * n_items, [(1, 30), (1, 31)], 1.6, [0.0, 0.01])
    for match in matches:
        for seed in range(4):  # two distinct sets, each drawn twice
            heads = [(1, 5), (1, 6)] if seed % 2 else [(1, 7), (1, 8)]
            norm = 4.0 if match == "layer" else 6.0
            _job(tmp_path, f"random_{match}_{seed}", 2, "random", [1] * 35 + [0] * 5, heads,
                 norm, [0.1, 0.2], seed=seed, match=match)
    return summarize(tmp_path)


def test_the_high_row_says_how_the_controls_norms_compare_with_its_own(tmp_path):
    df = _sweep(tmp_path)
    high = df[df.condition == "high"].iloc[0]
    assert high.output_norm_mean == 8.0
    assert high.low_norm_ratio == pytest.approx(0.2)
    assert high.random_norm_ratio == pytest.approx(0.75)
    assert high.n_random_sets == 2 and high.n_random == 4
    assert (high.score_min, high.score_mean, high.score_max) == pytest.approx((0.6, 0.7, 0.8))
    low = df[df.condition == "low"].iloc[0]
    assert low.output_norm_mean == 1.6 and pd.isna(low.low_norm_ratio)
    assert pd.isna(df[df.condition == "none"].iloc[0].output_norm_mean)
    md = (tmp_path / "summary.md").read_text()
    assert "### Head sets" in md
    assert "0.20x" in md and "0.75x" in md and "2 of 4" in md


def test_a_norm_matched_null_is_the_null_of_the_arms_high_and_low_rows(tmp_path):
    # the random draws' settings hold control (layer_norm); high and low's do not: one group
    df = _sweep(tmp_path)
    assert df.group.nunique() == 1
    assert "control.match=layer_norm" in df.group.iloc[0]
    assert df[df.condition == "high"].iloc[0].n_random == 4


def test_two_matches_make_two_nulls_for_the_same_high_and_low(tmp_path):
    df = _sweep(tmp_path, matches=("layer", "layer_norm"))
    assert df.group.nunique() == 2
    highs = df[df.condition == "high"].set_index("group")
    assert sorted(highs.random_norm_ratio) == pytest.approx([0.5, 0.75])
    assert (highs.n_random == 4).all()
    assert set(highs.index) == {g for g in df.group if "layer_norm" in g} | \
        {g for g in df.group if "layer_norm" not in g}
    # no draw of one match is pooled into the other's null
    assert (df[df.condition == "random"].groupby("group").size() == 4).all()


def test_jobs_without_norms_leave_the_section_out_in_one_line(tmp_path):
    make_job(tmp_path, "none", 0, "none", [1] * 10)
    make_job(tmp_path, "high", 2, "high", [0] * 10)
    df = summarize(tmp_path)
    assert df.output_norm_mean.isna().all()
    assert "*Head sets: left out: no job.json has `output_norm_mean`" in \
        (tmp_path / "summary.md").read_text()


def test_a_null_of_few_distinct_sets_is_said_to_be_few_controls(tmp_path):
    # 4 draws of 2 distinct sets: the p vs random compares with 2 controls, and says so
    df = _sweep(tmp_path)
    assert (df[df.condition.isin(["high", "low"])].n_random_sets == 2).all()
    md = (tmp_path / "summary.md").read_text()
    assert "the K=4 draws are only 2 distinct head sets" in md
    assert "compares the row with 2 control sets, not with a distribution" in md


def test_the_figure_names_a_norm_matched_null(tmp_path):
    """accuracy_vs_n.png's legend says which null it draws: the norm-matched draws are
    "layer- and norm-matched random heads", the plain ones "random heads"."""
    import matplotlib

    matplotlib.use("Agg")
    from ih_sweep.report.plots import plot_null

    df = _sweep(tmp_path)
    for match, label in (("layer_norm", "layer- and norm-matched random heads"),
                         ("layer", "random heads")):
        random = df[df.condition == "random"].assign(x=2.0)
        if match == "layer":
            random = random.assign(group=random.group.str.replace(
                ", control.match=layer_norm (norm_factor=2)", "", regex=False))
        fig, ax = matplotlib.pyplot.subplots()
        plot_null(ax, random)
        labels = ax.get_legend_handles_labels()[1]
        matplotlib.pyplot.close(fig)
        assert labels and labels[0].startswith(label + ":"), labels

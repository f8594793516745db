from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from summary_jobs import make_job

from ih_sweep.report.errors import SummaryError, SummaryIncomplete
from ih_sweep.report.summarize import summarize


@pytest.fixture
def sweep(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.random(200) < 0.9
    high = base.copy()
    high[:60] = False
    low = base.copy()
    low[0] = not low[0]
    make_job(tmp_path, "none4", 4, "none", base)
    make_job(tmp_path, "high4", 4, "high", high)
    make_job(tmp_path, "low4", 4, "low", low)
    for s in range(5):
        r = base.copy()
        r[rng.choice(200, 3, replace=False)] = False
        make_job(tmp_path, f"rand{s}", 4, "random", r, seed=s)
    return tmp_path, base, high, low


def test_summary_values(sweep):
    root, base, high, low = sweep
    df = summarize(root).set_index(["condition", "control_seed"])
    h = df.loc[("high", 0)]
    high_acc = high.mean()
    assert h.n_items == 200 and h.n_correct == high.sum()
    assert h.accuracy == pytest.approx(high.mean())
    assert h.ci_low < h.accuracy < h.ci_high
    assert h.delta_vs_none == pytest.approx(high.mean() - base.mean())
    assert h.delta_ci_low < h.delta_vs_none < h.delta_ci_high < 0
    b = int((~high & base).sum())  # items only `none` got right
    from ih_sweep.report.statistics import mcnemar_exact

    assert h.p_vs_none == pytest.approx(mcnemar_exact(0, b))
    assert h.p_vs_low < 1e-6 and h.delta_vs_low < 0
    from ih_sweep.report.statistics import paired_bootstrap_ci

    assert (h.delta_vs_low_ci_low, h.delta_vs_low_ci_high) == paired_bootstrap_ci(high, low)
    assert h.delta_vs_low_ci_low < h.delta_vs_low < h.delta_vs_low_ci_high < 0
    assert h.p_vs_random == pytest.approx(1 / 6) and h.n_random == 5
    assert df.loc[("low", 0)].p_vs_none == pytest.approx(1.0)
    assert np.isnan(df.loc[("none", 0)].p_vs_none_holm)
    # Holm (1979) over the ablated jobs' p-values but the random draws' (the null's sample:
    # high and low here): the i-th smallest (0-based) times (2 - i), running maximum, capped
    # at 1
    conditions = df.index.get_level_values(0)
    raw = df[~conditions.isin(["none", "random"])].p_vs_none.sort_values()
    assert len(raw) == 2
    expected = np.minimum(1, np.maximum.accumulate(raw.to_numpy() * (2 - np.arange(2))))
    got = df.loc[raw.index].p_vs_none_holm.to_numpy()
    assert got == pytest.approx(expected)
    assert h.p_vs_none_holm == pytest.approx(2 * h.p_vs_none)  # the smallest p: times 2
    assert df[conditions == "random"].p_vs_none_holm.isna().all()
    for name in ("summary.csv", "summary.md", "summary.tex", "accuracy_vs_n.png"):
        assert (root / name).is_file()
    md = (root / "summary.md").read_text()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in md.splitlines() if line.startswith("|")]
    header = rows[0]
    high = next(r for r in rows if r[1] == "high")
    assert dict(zip(header, high)) == {
        "N": "4", "condition": "high", "control seed": "", "items": "200",
        "accuracy %": f"{100 * high_acc:.1f}", "95% CI": f"[{100 * h.ci_low:.1f}, "
        f"{100 * h.ci_high:.1f}]", "Δ vs none (pts)": f"{100 * h.delta_vs_none:.1f}",
        "95% CI of Δ": f"[{100 * h.delta_ci_low:.1f}, {100 * h.delta_ci_high:.1f}]",
        "p vs none": f"{h.p_vs_none:.3g}", "p vs none (Holm)": f"{h.p_vs_none_holm:.3g}",
        "Δ vs low (pts)": f"{100 * h.delta_vs_low:.1f}", "p vs low": f"{h.p_vs_low:.3g}",
        "p vs low (Holm)": f"{h.p_vs_low_holm:.3g}",
        "random 2.5-97.5% (draws)": f"[{100 * h.random_acc_p2_5:.1f}, "
        f"{100 * h.random_acc_p97_5:.1f}] (5)", "p vs random": f"{h.p_vs_random:.3g}",
        "p vs random (Holm)": f"{h.p_vs_random_holm:.3g}"}
    none_rows = [r for r in rows if r[1] == "none"]
    assert len(none_rows) == 1 and none_rows[0][0] == "" and none_rows[0][6:] == [""] * 10
    # the draws are carried by the high and low rows (band, p vs random): not shown on
    # their own, but every one is a row of summary.csv
    assert [r for r in rows if r[1] == "random"] == []
    assert sorted(df.loc["random"].index) == [0, 1, 2, 3, 4]
    assert "### Legend" in md and "Wilson score interval" in md
    assert "\\toprule" in (root / "summary.tex").read_text()


def test_rows_in_two_threads_equal_rows_in_one(sweep, monkeypatch):
    """summary.csv's rows are computed two at a time (their bootstraps alongside,
    ih_sweep.report.rows.Turns): the same table, bit for bit and in the same order, as one
    row after the other."""
    from ih_sweep.report import rows
    from ih_sweep.report.discover import find_jobs

    root = sweep[0]
    jobs = find_jobs(root).jobs
    assert rows.ROW_THREADS == 2
    two, _ = rows.summarize_jobs(jobs)
    monkeypatch.setattr(rows, "ROW_THREADS", 1)
    one, _ = rows.summarize_jobs(jobs)
    pd.testing.assert_frame_equal(two, one, check_exact=True)
    assert len(one) == 8


def test_turns_give_way_only_inside_a_bootstrap():
    """One thread at a time holds the turn; inside aside() (a bootstrap) the other thread
    may take it, and the first waits for it back; outside any turn aside() does nothing."""
    import threading

    from ih_sweep.report.rows import Turns

    turns, order = Turns(), []
    with turns.aside():  # no turn held: nothing to give away
        order.append("free")
    taken = threading.Event()

    def other():
        with turns.turn():
            order.append("other")
            taken.set()

    with turns.turn():
        worker = threading.Thread(target=other)
        worker.start()
        assert not taken.wait(0.2)  # the turn is held: the other thread waits
        with turns.aside():
            assert taken.wait(10)  # given away: the other row runs meanwhile
        order.append("back")
    worker.join()
    assert order == ["free", "other", "back"]


def test_idempotent(sweep):
    """A second summary of the same jobs writes the same files, byte for byte (each file
    removed first, so the second run has to write it again), and returns the same table."""
    root, *_ = sweep
    a = summarize(root)
    written = sorted(p.name for p in root.iterdir() if p.suffix in (".csv", ".md", ".tex"))
    assert {"summary.csv", "summary.md", "summary.tex"} <= set(written)
    first = {name: (root / name).read_bytes() for name in written}
    for name in written:
        (root / name).unlink()
    b = summarize(root)
    assert {name: (root / name).read_bytes() for name in written} == first
    pd.testing.assert_frame_equal(a, b)


def test_missing_failed_and_half_written_jobs_are_listed(sweep, caplog):
    root, *_ = sweep
    (root / "crashed" / ".hydra").mkdir(parents=True)
    (root / "crashed" / ".hydra" / "config.yaml").write_text("{}\n")
    half = make_job(root, "half", 8, "high", [True] * 10)
    (half / "results.csv").write_text(
        (half / "results.csv").read_text().splitlines()[0] + "\n1,4\n")
    broken = make_job(root, "broken", 8, "low", [True] * 10)
    (broken / "job.json").write_text("{not json")
    with pytest.raises(SummaryIncomplete) as caught:
        summarize(root)
    df = caught.value.table  # written all the same, with the jobs that finished
    assert len(df) == 8 and not caught.value.failed
    assert [f for f, _ in caught.value.left_out] == ["broken", "crashed", "half"]
    assert pd.read_csv(root / "summary.csv").shape[0] == 8
    md = (root / "summary.md").read_text()
    assert "## Jobs left out" in md
    for name in ("crashed", "half", "broken"):
        assert f"`{name}`" in md
    assert "crashed" in caplog.text


def test_different_models_are_not_pooled(tmp_path):
    make_job(tmp_path, "a", 0, "none", [True, False] * 10, model="tiny")
    make_job(tmp_path, "b", 4, "high", [False] * 20, model="other")
    df = summarize(tmp_path)
    assert df["group"].nunique() == 2
    assert df["delta_vs_none"].isna().all()  # 'other' has no none to compare with
    md = (tmp_path / "summary.md").read_text()
    assert "Jobs differ in model.name; each group is summarized on its own and never pooled" \
        in md


def test_icl_curve(tmp_path):
    examples = [0, 1, 2, 3, 4] * 20
    make_job(tmp_path, "none", 0, "none", [e > 1 for e in examples], scope="all",
             examples=examples)
    summarize(tmp_path)
    curve = pd.read_csv(tmp_path / "icl_curve.csv")
    assert curve.set_index("examples_before")["accuracy"].to_dict() == {0: 0, 1: 0, 2: 1, 3: 1,
                                                                         4: 1}
    assert (tmp_path / "icl_curve.png").is_file()


def test_empty_or_foreign_folder_one_line_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SummaryError, match="no ih_sweep jobs here"):
        summarize(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "ih_sweep.report", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no ih_sweep jobs here" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ih_sweep.report", str(tmp_path / "x")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not a folder" in proc.stderr


def _settings(cond, n, data_seed=0, seed=0):
    out = {"job": "evaluate", "n_heads": n, "condition": cond, "model": {"name": "tiny"},
           "data": {"name": "babi_generated", "task": 1, "seed": data_seed},
           "eval": {"metric": "contains", "scope": "last"}}
    if cond == "random":
        out["control_seed"] = seed
    if cond != "none":
        out |= {"scoring": {"rank_by": "prefix"}, "ablation": {"method": "zero"}}
    return out


def test_a_setting_that_differs_separates_rows_and_is_named(tmp_path):
    """-m n_heads=8 condition=high,none data.seed=0,1: four jobs, four rows in two groups."""
    rng = np.random.default_rng(0)
    for data_seed in (0, 1):
        for cond in ("high", "none"):
            make_job(tmp_path, f"{cond}{data_seed}", 8, cond, rng.random(30) < 0.7,
                     settings=_settings(cond, 8, data_seed), config_hash=f"{cond}{data_seed}")
    df = summarize(tmp_path)
    assert len(df) == 4 and df["group"].nunique() == 2
    assert sorted(g.split("data.seed=")[1] for g in df["group"].unique()) == ["0", "1"]
    assert df[df.condition == "high"]["delta_vs_none"].notna().all()
    assert "Jobs differ in data.seed" in (tmp_path / "summary.md").read_text()


def test_the_same_job_twice_is_one_row_and_said_so(tmp_path, caplog):
    """control_seed crossed with condition=high: the same job three times, one row."""
    caplog.set_level("INFO")
    base = np.random.default_rng(1).random(40) < 0.8
    make_job(tmp_path, "none", 4, "none", base, settings=_settings("none", 4),
             config_hash="n")
    for seed in range(3):
        make_job(tmp_path, f"high_s{seed}", 4, "high", base & (np.arange(40) > 5), seed=seed,
                 settings=_settings("high", 4), config_hash="h")
    df = summarize(tmp_path)
    assert sorted(df.condition) == ["high", "none"]
    assert df.p_vs_none_holm.notna().sum() == 1  # Holm's family: the one distinct comparison
    note = ("3 jobs evaluate high N=4 (the control seed only draws random heads): one row "
            "(high_s0, high_s1, high_s2).")
    assert note in (tmp_path / "summary.md").read_text() and note in caplog.text


def test_a_random_only_sweep_says_what_it_cannot_compare(tmp_path):
    rng = np.random.default_rng(2)
    for seed in range(3):
        make_job(tmp_path, f"r{seed}", 8, "random", rng.random(30) < 0.5, seed=seed,
                 settings=_settings("random", 8, seed=seed), config_hash=f"r{seed}")
    df = summarize(tmp_path)
    assert len(df) == 3 and df.delta_vs_none.isna().all()
    assert "only random draws, so nothing is compared: add condition=none" in \
        (tmp_path / "summary.md").read_text()


def test_jobs_that_multirun_yaml_lists_but_are_missing_are_named(tmp_path):
    """A sweep folder written by the real CLI (multirun.yaml lists 4 jobs), one job folder
    deleted afterwards: the summary says 3 jobs and names the missing one."""
    import shutil

    from compose_config import compose
    from omegaconf import OmegaConf

    cfg = compose("n_heads=4", return_hydra_config=True)
    OmegaConf.update(cfg, "hydra.overrides.task", ["n_heads=4,8", "condition=high,none"],
                     force_add=True)
    (tmp_path / "multirun.yaml").write_text(OmegaConf.to_yaml(cfg))
    rng = np.random.default_rng(3)
    for n in (4, 8):
        for cond in ("high", "none"):
            make_job(tmp_path, f"condition={cond},n_heads={n}", n, cond, rng.random(20) < 0.8,
                     settings=_settings(cond, n), config_hash=f"{cond}{n}")
    shutil.rmtree(tmp_path / "condition=high,n_heads=8")
    with pytest.raises(SummaryIncomplete, match="1 job.s. left out .condition=high,n_heads=8: "
                                                "multirun.yaml lists this job"):
        summarize(tmp_path)
    md = (tmp_path / "summary.md").read_text()
    assert "`condition=high,n_heads=8`: multirun.yaml lists this job, but its folder is " \
           "missing" in md


def test_arm_titles_name_what_tells_the_arms_apart(tmp_path):
    """The four arms of Yin & Steinhardt's comparison: titles name rank_by once (not also as
    scoring.rank_by) and the exclusion, not the FV settings every FV arm shares (an arm
    without FV has none); FV settings that do differ between FV arms are named."""
    fv = {"fv_prompts": 25, "fv_mean_prompts": 100, "fv_seed": 0}
    arms = {"prefix": {"rank_by": "prefix"}, "fv": {"rank_by": "fv", **fv},
            "prefix_not_fv": {"rank_by": "prefix", "exclude_by": "fv", "exclude_share": 0.02,
                              **fv},
            "fv_seed1": {"rank_by": "fv", **fv, "fv_seed": 1}}
    make_job(tmp_path, "none", 0, "none", [True] * 10, settings={"model": {"name": "tiny"}})
    for name, scoring in arms.items():
        make_job(tmp_path, name, 4, "high", [False] * 10,
                 settings={"model": {"name": "tiny"}, "scoring": scoring})
    summarize(tmp_path)
    titles = [line for line in (tmp_path / "summary.md").read_text().splitlines()
              if line.startswith("## model=")]
    assert len(titles) == 4
    assert not any("scoring.rank_by" in t or "fv_prompts" in t or "fv_mean_prompts" in t
                   for t in titles)
    assert sum("scoring.exclude_by=fv, scoring.exclude_share=0.02" in t for t in titles) == 1
    assert sorted(t.count("scoring.fv_seed=") for t in titles) == [0, 1, 1, 1]  # 0 vs 1


def test_many_random_draws_are_carried_by_the_rows_they_are_compared_with(tmp_path):
    """K >= 3 draws at an N with a high row there: the tables show high with the null's
    band, not the draws (summary.csv keeps each); 2 draws at another N stay shown."""
    make_job(tmp_path, "none", 0, "none", [True] * 10)
    make_job(tmp_path, "high4", 4, "high", [False] * 10)
    make_job(tmp_path, "high8", 8, "high", [False] * 10)
    for k in range(3):
        make_job(tmp_path, f"r4-{k}", 4, "random", [True] * (9 + k % 2) + [False] * (1 - k % 2),
                 seed=k)
    for k in range(2):
        make_job(tmp_path, f"r8-{k}", 8, "random", [True] * 10, seed=k)
    df = summarize(tmp_path)
    assert (df.condition == "random").sum() == 5
    md = (tmp_path / "summary.md").read_text()
    main = md[md.index("## model="):md.index("###")]
    shown = [[c.strip() for c in line.strip("|").split("|")] for line in main.splitlines()
             if line.startswith("|")][2:]
    assert [(r[0], r[1], r[2]) for r in shown if r[1] == "random"] == [("8", "random", "0"),
                                                                       ("8", "random", "1")]
    high4 = next(r for r in shown if r[:2] == ["4", "high"])
    assert high4[-3] == "[90.0, 99.5] (3)"  # of 90, 90, 100 (linear interpolation)


def test_the_null_section_sets_the_arms_side_by_side(tmp_path):
    """Two arms (induction heads by prefix; FV heads outside the top 2% by prefix), each
    with high, low and 3 random draws at N=4: one table across the arms, every compared
    row with its own arm's null; the draws' rows are not in it."""
    make_job(tmp_path, "none", 0, "none", [True] * 10, settings={"model": {"name": "tiny"}})
    arms = {"prefix": {"rank_by": "prefix"},
            "fvx": {"rank_by": "fv", "exclude_by": "prefix", "exclude_share": 0.02}}
    for name, scoring in arms.items():
        settings = {"model": {"name": "tiny"}, "scoring": scoring}
        wrong = 6 if name == "prefix" else 0
        rank = scoring["rank_by"]
        make_job(tmp_path, f"{name}-high", 4, "high", [False] * wrong + [True] * (10 - wrong),
                 settings=settings, rank_by=rank)
        make_job(tmp_path, f"{name}-low", 4, "low", [True] * 10, settings=settings,
                 rank_by=rank)
        for k in range(3):
            make_job(tmp_path, f"{name}-r{k}", 4, "random", [True] * (9 + k % 2) +
                     [False] * (1 - k % 2), seed=k, settings=settings, rank_by=rank)
    summarize(tmp_path)
    md = (tmp_path / "summary.md").read_text()
    section = md[md.index("## Against the random null"):md.index("### Legend")]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("|")]
    assert rows[0] == ["arm", "condition", "N", "accuracy % [95% CI]",
                       "random 2.5-97.5% (draws)", "p vs random", "p vs random (Holm)",
                       "Δ vs none (pts)"]
    got = {(r[0], r[1]): (r[3].split()[0], r[4], r[5]) for r in rows[2:]}
    assert got == {
        ("top-N by fv, outside the top 2% by prefix", "high"): ("100.0", "[90.0, 99.5] (3)", "1"),
        ("top-N by fv, outside the top 2% by prefix", "low"): ("100.0", "[90.0, 99.5] (3)", "1"),
        ("top-N by prefix", "high"): ("40.0", "[90.0, 99.5] (3)", "0.25"),
        ("top-N by prefix", "low"): ("100.0", "[90.0, 99.5] (3)", "1")}
    assert "**Against the random null**" in md


def test_figure_titles_and_legends_say_how_the_heads_were_chosen():
    from types import SimpleNamespace as Row

    from ih_sweep.report.cells import heads_phrase
    from ih_sweep.report.plots import high_label

    plain = Row(group="model=tiny, ..., rank_by=prefix", rank_by="prefix")
    fvx = Row(group="model=tiny, ..., rank_by=fv, scoring.exclude_by=prefix, "
                    "scoring.exclude_share=0.02", rank_by="fv")
    assert heads_phrase(plain) == "top-N by prefix"
    assert heads_phrase(fvx) == "top-N by fv, outside the top 2% by prefix"
    assert high_label(plain) == "top-N by prefix (induction heads)"
    assert high_label(fvx) == "top-N by fv, outside the top 2% by prefix\n(FV heads)"

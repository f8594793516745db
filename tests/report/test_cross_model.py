"""Cross-model tables (issue #18 item 5): ``python -m ih_sweep.report A B --out C``.

The pure table functions on hand-made jobs; the group key keeps dtypes apart; the error
paths of the command; and one end-to-end run over real small sweeps made by the CLI (tiny
float32, tiny nf4 through bitsandbytes on the CPU, and a random-weight Llama)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ih_sweep.pipeline.records import RESULT_COLUMNS, EvaluationRecord
from ih_sweep.report import cross_model as cm
from ih_sweep.report import statistics as st
from ih_sweep.report.command import main
from ih_sweep.report.discover import FinishedJob
from ih_sweep.report.groups import cell_groups
from ih_sweep.report.rows import summarize_jobs

ROOT = Path(__file__).resolve().parents[2]
TINY = {"name": "tiny", "path": "builtin:tiny", "dtype": "float32"}
NONE = {"name": "none", "double_quant": True, "compute_dtype": "bfloat16"}
NF4 = {"name": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}


def job(n: int, cond: str, correct, model=TINY, quantization=NONE, seed: int = 0,
        near_tie=None) -> FinishedJob:
    """An evaluate job in memory: its record (with the settings a real job writes: model,
    quantization, data, eval, ablation) and its results."""
    correct = np.asarray(correct, dtype=bool)
    results = pd.DataFrame({c: [""] * len(correct) for c in RESULT_COLUMNS})
    results["story"], results["question_index"] = range(len(correct)), 4
    results["correct"] = correct
    results["near_tie"] = near_tie if near_tie is not None else np.nan
    data = {"name": "babi_generated", "task": 1, "n_stories": len(correct), "seed": 0}
    evaluation = {"metric": "contains", "scope": "last", "max_new_tokens": 3}
    settings = {"model": dict(model), "quantization": dict(quantization), "data": data,
                "eval": evaluation, "n_heads": n, "condition": cond}
    if cond != "none":
        settings |= {"ablation": {"method": "zero"}, "scoring": {"rank_by": "prefix"}}
    if cond == "random":
        settings["control_seed"] = seed
    record = EvaluationRecord(
        config_hash="0" * 16, n_heads=n, condition=cond, control_seed=seed,
        model=model["name"], quantization=quantization["name"], data=data, eval=evaluation,
        ablation="zero", rank_by="prefix", n_items=len(correct), n_correct=int(correct.sum()),
        accuracy=float(correct.mean()), n_decoded=0, heads=[], settings=settings)
    return FinishedJob(Path(f"{model['name']}-{cond}{n}-{seed}"), record, results)


def sweep_jobs(rng, model=TINY, quantization=NONE, near_ties: bool = False, drop: int = 60
               ) -> tuple[list[FinishedJob], dict[str, np.ndarray]]:
    """none, high and low at N=4 (high loses ``drop`` items), three random draws."""
    base = rng.random(200) < 0.9
    high, low = base.copy(), base.copy()
    high[:drop] = False
    low[100:103] = False
    tie = (lambda: rng.random(200) < 0.05) if near_ties else (lambda: None)
    jobs = [job(4, "none", base, model, quantization, near_tie=tie()),
            job(4, "high", high, model, quantization, near_tie=tie()),
            job(4, "low", low, model, quantization, near_tie=tie())]
    for s in range(3):
        r = base.copy()
        r[rng.choice(200, 5, replace=False)] = False
        jobs.append(job(4, "random", r, model, quantization, seed=s, near_tie=tie()))
    return jobs, {"none": base, "high": high, "low": low}


# --------------------------------------------------------------------------- pure functions
def test_labels_name_what_differs_between_the_models():
    fp32, bf16 = {"model.name": "tiny", "model.dtype": "float32", "quantization.name": "none"}, \
        {"model.name": "tiny", "model.dtype": "bfloat16", "quantization.name": "none"}
    assert cm.model_labels([fp32, bf16]) == ["tiny (dtype=float32)", "tiny (dtype=bfloat16)"]
    nf4 = {**fp32, "quantization.name": "nf4", "quantization.double_quant": True,
           "quantization.compute_dtype": "bfloat16"}
    # the quantization's own settings, which `none` has not, are not a difference
    assert cm.model_labels([fp32, nf4]) == ["tiny (quantization=none)", "tiny (quantization=nf4)"]
    other = {**fp32, "model.name": "llama-rand"}
    assert cm.model_labels([fp32, other, nf4]) == ["tiny (quantization=none)", "llama-rand",
                                                   "tiny (quantization=nf4)"]


def test_identity_ignores_the_settings_of_no_quantization():
    a = job(4, "high", [True], quantization=NONE).record
    b = job(4, "high", [True], quantization={**NONE, "compute_dtype": "float16"}).record
    assert cm.model_identity(a) == cm.model_identity(b) == {
        "model.name": "tiny", "model.path": "builtin:tiny", "model.dtype": "float32",
        "quantization.name": "none"}
    c = job(4, "high", [True], quantization=NF4).record
    assert cm.model_identity(c)["quantization.compute_dtype"] == "bfloat16"


def test_cross_table_equals_each_sweeps_own_summary():
    rng = np.random.default_rng(0)
    a, outcomes = sweep_jobs(rng, near_ties=True)
    b, _ = sweep_jobs(rng, quantization=NF4, drop=20)
    table, notes = cm.cross_table({"A": a, "B": b})
    assert notes == []
    assert list(table.columns) == cm.CROSS_COLUMNS
    assert table.model_key.tolist() == ["tiny (quantization=none)", "tiny (quantization=nf4)"]
    assert table.sweep.tolist() == ["A", "B"] and table.n_heads.tolist() == [4, 4]
    for name, jobs, row in (("A", a, table.iloc[0]), ("B", b, table.iloc[1])):
        own = summarize_jobs(jobs)[0].set_index(["condition", "control_seed"])
        for cond in ("none", "high", "low"):
            for m in ("accuracy", "ci_low", "ci_high"):
                assert row[f"{m}_{cond}"] == own.loc[(cond, 0), m], (name, cond, m)
        high = own.loc[("high", 0)]
        for mine, theirs in (("delta_high_vs_none", "delta_vs_none"),
                             ("delta_high_vs_none_ci_low", "delta_ci_low"),
                             ("delta_high_vs_none_ci_high", "delta_ci_high"),
                             ("p_high_vs_none", "p_vs_none"), ("delta_high_vs_low", "delta_vs_low"),
                             ("delta_high_vs_low_ci_low", "delta_vs_low_ci_low"),
                             ("delta_high_vs_low_ci_high", "delta_vs_low_ci_high"),
                             ("p_high_vs_low", "p_vs_low"), ("p_high_vs_random", "p_vs_random")):
            assert row[mine] == high[theirs], (name, mine)
        assert row.n_random == 3
        assert row.accuracy_random == pytest.approx(own.loc["random"].accuracy.mean())
    # high - low's paired bootstrap interval (summary.csv's delta_vs_low_ci_*)
    row = table.iloc[0]
    ci = st.paired_bootstrap_ci(outcomes["high"], outcomes["low"])
    assert (row.delta_high_vs_low_ci_low, row.delta_high_vs_low_ci_high) == ci
    assert ci[1] < 0 and row.delta_high_vs_low == pytest.approx(
        outcomes["high"].mean() - outcomes["low"].mean())
    # near-tie verdicts where the jobs recorded near-ties, empty where not
    assert row.within_near_ties_vs_none in (True, False)
    assert pd.isna(table.iloc[1].within_near_ties_vs_none)
    shown = cm.display_table(table)
    assert "Δ vs none within near-ties" in shown.columns and shown.N.tolist() == ["4", "4"]
    assert shown["high % [95% CI]"].iloc[0] == (
        f"{100 * row.accuracy_high:.1f} [{100 * row.ci_low_high:.1f}, "
        f"{100 * row.ci_high_high:.1f}]")


def test_share_column_is_carried_where_the_summary_has_it():
    """n_heads_share (the dose as a share of all heads, percent) comes from the sweep's
    summary, empty where a count was asked; N then shows both."""
    rng = np.random.default_rng(6)
    jobs, _ = sweep_jobs(rng)
    groups, notes = cell_groups(jobs)
    summary, _ = summarize_jobs(jobs, (groups, notes))
    assert pd.isna(cm.group_rows(summary, groups[0])[0]["n_heads_share"])
    shared = summary.assign(n_heads_share=np.where(summary.condition == "none", np.nan, 6.25))
    row = cm.group_rows(shared, groups[0])[0]
    assert row["n_heads_share"] == 6.25
    table = pd.DataFrame([{"model_key": "tiny", "sweep": "A", **row}], columns=cm.CROSS_COLUMNS)
    assert cm.display_table(table)["N"].tolist() == ["4 (6.25%)"]


def test_one_model_in_two_sweeps_is_refused():
    rng = np.random.default_rng(1)
    with pytest.raises(cm.CrossModelError, match="A and B both hold tiny"):
        cm.cross_table({"A": sweep_jobs(rng)[0], "B": sweep_jobs(rng)[0]})


def test_dtype_keeps_sweeps_and_groups_apart():
    """A bfloat16 and a float32 run of one model are two models here: in two sweeps, two row
    groups; in one sweep, two summary groups named by their dtype (never compared)."""
    rng = np.random.default_rng(2)
    bf16 = {**TINY, "dtype": "bfloat16"}
    a, _ = sweep_jobs(rng)
    b, _ = sweep_jobs(rng, model=bf16, drop=10)
    table, _ = cm.cross_table({"A": a, "B": b})
    assert table.model_key.tolist() == ["tiny (dtype=float32)", "tiny (dtype=bfloat16)"]
    assert table.dtype.tolist() == ["float32", "bfloat16"]
    groups, _ = cell_groups(a + b)
    assert len(groups) == 2
    assert sorted(g.name.rsplit(", ", 1)[1] for g in groups) == ["model.dtype=bfloat16",
                                                                  "model.dtype=float32"]
    both, _ = cm.cross_table({"AB": a + b})
    assert both.model_key.tolist() == ["tiny (dtype=float32)", "tiny (dtype=bfloat16)"]
    assert both.accuracy_high.tolist() == table.accuracy_high.tolist()


def test_a_model_with_two_groups_gets_numbered_rows():
    rng = np.random.default_rng(3)
    a, _ = sweep_jobs(rng)
    other = [job(j.record.n_heads, j.record.condition, j.results.correct,
                 seed=j.record.control_seed) for j in sweep_jobs(rng)[0]]
    for j in other:  # the same model on task 2: a second group of the sweep
        j.record.data = {**j.record.data, "task": 2}
        j.record.settings["data"] = j.record.data
    table, _ = cm.cross_table({"A": a + other, "B": sweep_jobs(rng, quantization=NF4)[0]})
    labels = cm.row_group_labels(table).tolist()
    assert labels == ["tiny (quantization=none) [1]", "tiny (quantization=none) [2]",
                      "tiny (quantization=nf4)"]
    assert cm.display_table(table)["model"].tolist() == labels


# --------------------------------------------------------------------------- the command
def _write(root: Path, jobs: list[FinishedJob]) -> Path:
    """Job folders of ``jobs`` under ``root`` (a sweep on disk)."""
    import dataclasses

    from ih_sweep.pipeline.records import sha256, write_record

    for j in jobs:
        folder = root / j.path
        folder.mkdir(parents=True)
        j.results.to_csv(folder / "results.csv", index=False)
        write_record(folder, dataclasses.replace(
            j.record, results_sha256=sha256(folder / "results.csv")))
    return root


def test_command_error_paths(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(4)
    a = _write(tmp_path / "a", sweep_jobs(rng)[0])
    b = _write(tmp_path / "b", sweep_jobs(rng, quantization=NF4)[0])
    same = _write(tmp_path / "same", sweep_jobs(rng)[0])
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [([str(a), str(tmp_path / "missing")], "missing: not a folder"),
             ([str(a), str(empty)], "empty: no ih_sweep evaluation jobs"),
             ([str(a), str(same)], "both hold tiny"),
             ([str(a), str(b), "--out", str(a / "cmp")], "lies inside the sweep"),
             ([str(a), str(a)], "given twice"),
             ([str(a), "--out", str(tmp_path / "x")], "--out is for several sweeps")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (argv, err)
    assert not (tmp_path / "x").exists() and not (a / "cmp").exists()
    monkeypatch.chdir(tmp_path)  # without --out: outputs/compare/<time> here
    assert main([str(a), str(b)]) == 0
    made = list((tmp_path / "outputs" / "compare").iterdir())
    assert len(made) == 1 and (made[0] / "cross_model.csv").is_file()
    assert f"in: {Path('outputs/compare') / made[0].name}" in capsys.readouterr().out
    assert sorted(p.name for p in a.iterdir()) == sorted(str(j) for j in (
        "tiny-high4-0", "tiny-low4-0", "tiny-none4-0", "tiny-random4-0", "tiny-random4-1",
        "tiny-random4-2"))


def test_command_incomplete_writes_what_it_can(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(5)
    a = _write(tmp_path / "a", sweep_jobs(rng)[0])
    b = _write(tmp_path / "b", sweep_jobs(rng, quantization=NF4)[0])
    (b / "broken").mkdir()
    (b / "broken" / "job.json").write_text("{not json")
    out = tmp_path / "out"
    assert main([str(a), str(b), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "1 job(s) left out" in err and "broken" in err and "\n" not in err
    md = (out / "cross_model.md").read_text()
    assert "## Jobs left out" in md and "broken`: unreadable job.json" in md
    assert len(pd.read_csv(out / "cross_model.csv")) == 2
    (b / "broken" / "job.json").unlink()
    (b / "broken").rmdir()

    def fail(table, path):
        raise RuntimeError("no figure today")

    monkeypatch.setattr(cm, "plot_cross", fail)
    out2 = tmp_path / "out2"
    assert main([str(a), str(b), "--out", str(out2)]) == 1
    err = capsys.readouterr().err.strip()
    assert "cross_model.png failed (RuntimeError: no figure today)" in err
    assert sorted(p.name for p in out2.iterdir()) == ["cross_model.csv", "cross_model.md",
                                                      "cross_model.tex"]


# --------------------------------------------------------------------------- end to end
def _cli(*args: str, cwd: Path, module: str = "ih_sweep", status: int = 0
         ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == status, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n" \
                                      f"{proc.stderr[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """Three small sweeps by the CLI: tiny float32, tiny nf4 (bitsandbytes on the CPU) and a
    2-layer random-weight Llama (tests/model/test_families.py), high/low/none on 30 stories."""
    from families import family_configs, save_model

    root = tmp_path_factory.mktemp("cross")
    llama = save_model(family_configs()["llama"], root / "llama-rand")
    common = ["condition=high,low,none", "data.n_stories=30", "eval.progress=false",
              f"paths.cache_dir={root / 'cache'}"]
    runs = {"fp32": ["model.dtype=float32", "n_heads=8"],
            "nf4": ["quantization=nf4", "n_heads=8"],
            "llama": ["model=hub", f"model.path={llama}", "model.name=llama-rand", "n_heads=2"]}
    for name, args in runs.items():
        _cli("-m", *args, *common, f"hydra.sweep.dir={root / name}", cwd=root)
    return root


@pytest.mark.slow
def test_end_to_end_over_three_sweeps(sweeps):
    root = sweeps
    dirs = [root / n for n in ("fp32", "nf4", "llama")]
    before = {d: sorted((p.relative_to(d), p.stat().st_mtime_ns) for p in d.rglob("*"))
              for d in dirs}
    proc = _cli(*map(str, dirs), "--out", str(root / "cmp"), cwd=root,
                module="ih_sweep.report")
    assert f"in: {root / 'cmp'}" in proc.stdout
    assert {d: sorted((p.relative_to(d), p.stat().st_mtime_ns) for p in d.rglob("*"))
            for d in dirs} == before  # nothing written into a sweep
    table = pd.read_csv(root / "cmp" / "cross_model.csv")
    assert table.model_key.tolist() == ["tiny (quantization=none)", "tiny (quantization=nf4)",
                                        "llama-rand"]
    assert table.n_heads.tolist() == [8, 8, 2]
    for d, row in zip(dirs, table.itertuples()):
        own = pd.read_csv(d / "summary.csv").set_index("condition")
        assert row.sweep == str(d) and row.group == own.group.iloc[0]
        for cond in ("none", "high", "low"):
            for m in ("accuracy", "ci_low", "ci_high"):
                assert getattr(row, f"{m}_{cond}") == pytest.approx(own.loc[cond, m],
                                                                    rel=1e-12), (d, cond, m)
        for mine, theirs in (("delta_high_vs_none", "delta_vs_none"),
                             ("delta_high_vs_none_ci_low", "delta_ci_low"),
                             ("delta_high_vs_none_ci_high", "delta_ci_high"),
                             ("p_high_vs_none", "p_vs_none"), ("delta_high_vs_low", "delta_vs_low"),
                             ("delta_high_vs_low_ci_low", "delta_vs_low_ci_low"),
                             ("delta_high_vs_low_ci_high", "delta_vs_low_ci_high"),
                             ("p_high_vs_low", "p_vs_low"),
                             ("within_near_ties_vs_none", "within_near_ties_vs_none")):
            assert getattr(row, mine) == pytest.approx(own.loc["high", theirs], rel=1e-12), \
                (d, mine)
        assert row.n_items == 30
    md = (root / "cmp" / "cross_model.md").read_text()
    assert md.count("| tiny (quantization=n") == 2 and "| llama-rand " in md
    assert (root / "cmp" / "cross_model.png").stat().st_size > 0
    assert "tabular" in (root / "cmp" / "cross_model.tex").read_text()


@pytest.mark.slow
def test_end_to_end_exit_statuses(sweeps, tmp_path):
    """Through ``python -m ih_sweep.report``: a folder that is no sweep
    exits 2 and a sweep with a broken job 1, each with one line and no traceback."""
    import shutil

    root = sweeps
    proc = _cli(str(root / "fp32"), str(root / "missing"), "--out", str(tmp_path / "a"),
                cwd=root, module="ih_sweep.report", status=2)
    assert proc.stderr.strip().splitlines() == [
        f"ih_sweep.report: {root / 'missing'}: not a folder"]
    broken = shutil.copytree(root / "nf4", tmp_path / "nf4")
    (broken / "x").mkdir()
    (broken / "x" / "job.json").write_text("[]")
    proc = _cli(str(root / "fp32"), str(broken), "--out", str(tmp_path / "b"), cwd=root,
                module="ih_sweep.report", status=1)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ih_sweep.report: the summary in")
    assert "1 job(s) left out" in last
    assert "Traceback" not in proc.stderr
    assert len(pd.read_csv(tmp_path / "b" / "cross_model.csv")) == 2

"""The Python API (ih_sweep.api): the CLI's pipeline from a notebook. The same overrides
give byte-equal results.csv; a sweep comes back as DataFrames; mistakes are one-line
exceptions (never an exit) before any job runs; a CLI sweep folder loads."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from compose_config import cli

import ih_sweep.api as ih
from ih_sweep.config.errors import ConfigError, UserError


def test_expand_is_hydras_product_of_the_sweeps():
    jobs = ih.expand(["n_heads=4,8", "condition=high,none", "debug=fast"])
    assert jobs == [["n_heads=4", "condition=high", "debug=fast"],
                    ["n_heads=4", "condition=none", "debug=fast"],
                    ["n_heads=8", "condition=high", "debug=fast"],
                    ["n_heads=8", "condition=none", "debug=fast"]]
    assert ih.expand(["n_heads=range(2,5)"]) == [["n_heads=2"], ["n_heads=3"], ["n_heads=4"]]


@pytest.mark.parametrize("overrides, words", [
    (["n_heads=abc"], "n_heads"),
    (["condition=bogus"], "condition"),
    (["model=nope"], "model"),
    (["n_heads=4,abc", "debug=fast"], "n_heads"),
    (["n_heads=65", "debug=fast"], "n_heads=65"),
])
def test_a_mistake_is_one_line_exception_before_any_job(tmp_path, monkeypatch, overrides,
                                                        words):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as err:
        ih.run(*overrides)
    message = str(err.value)
    assert "\n" not in message and words in message
    assert not (tmp_path / "outputs" / "multirun").exists() or \
        not any((tmp_path / "outputs" / "multirun").rglob("job.json"))


def test_a_sweep_is_what_hydras_grammar_calls_one():
    assert ih.is_sweep(["n_heads=4,8"]) and ih.is_sweep(["n_heads=range(2,5)"])
    assert not ih.is_sweep(["n_heads=4", "eval.stop=[x,y]", "debug=fast"])
    assert ih.expand(["eval.stop=[x,y]"]) == [["eval.stop=[x,y]"]]


def test_unparsable_override_is_a_config_error():
    with pytest.raises(ConfigError):
        ih.expand(["n_heads=[1,"])


def test_a_job_equals_the_clis_and_a_sweep_comes_back_as_dataframes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = ["n_heads=8", "condition=high", "debug=fast"]
    job = ih.run(*overrides, f"hydra.run.dir={tmp_path}/api", f"paths.cache_dir={tmp_path}/a")
    assert isinstance(job, ih.Job) and len(job.results) == 20
    assert list(job.heads.columns)[:3] == ["layer", "head", "score"] and len(job.heads) == 8
    cli(*overrides, f"hydra.run.dir={tmp_path}/cli", f"paths.cache_dir={tmp_path}/c",
        cwd=tmp_path)
    assert (tmp_path / "api" / "results.csv").read_bytes() == \
        (tmp_path / "cli" / "results.csv").read_bytes()

    sweep = ih.run("n_heads=4,8", "condition=high,low,none", "debug=fast",
                   f"hydra.sweep.dir={tmp_path}/sweep", f"paths.cache_dir={tmp_path}/a")
    assert isinstance(sweep, ih.Sweep) and sweep.problems == []
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == sorted(
        f"condition={c},debug=fast,n_heads={n}" for n in (4, 8) for c in ("high", "low", "none"))
    assert (tmp_path / "sweep" / "summary.csv").is_file()
    table = sweep.table()
    assert list(table.columns) == ["N", "high", "low", "none"]
    assert table.N.tolist() == [4, 8]
    high8 = sweep.summary[(sweep.summary.condition == "high") & (sweep.summary.n_heads == 8)]
    assert table.loc[1, "high"].startswith(f"{100 * high8.accuracy.iloc[0]:.1f} [")
    # the N=8 high job was finished above: reused from the store, same bytes
    again = next(j for j in sweep.jobs if j.record.condition == "high" and
                 j.record.n_heads == 8)
    assert again.record.reused_evaluation
    assert (again.folder / "results.csv").read_bytes() == \
        (tmp_path / "api" / "results.csv").read_bytes()

    loaded = ih.load_sweep(tmp_path / "sweep")
    pd.testing.assert_frame_equal(loaded.summary, pd.read_csv(tmp_path / "sweep" /
                                                              "summary.csv"))
    assert len(loaded.jobs) == 6


def test_load_sweep_refuses_what_is_not_a_sweep(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        ih.load_sweep(tmp_path / "missing")
    with pytest.raises(UserError, match="not a finished job"):
        ih.load_job(Path(tmp_path))

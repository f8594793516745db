"""Finding a sweep's jobs (ih_sweep/report/discover.py): the jobs a multirun launched,
expanded from its overrides without Hydra's internals, and the jobs it lists that left no
folder."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ih_sweep.report.discover import MISSING_FOLDER, missing_jobs, sweep_jobs

CASES = [
    ["n_heads=4,8,16", "condition=high,low,none"],
    ["n_heads=8", "condition=high,low,none", "ablation=zero,mean,resample"],
    ["model.dtype=bfloat16", "n_heads=1%,3%", "condition=random", "control_seed=range(3)"],
    ["+extra=1", "n_heads=4,8", "~eval.progress", "n_heads=2,3"],  # a key given twice
    ["condition=choice(high,low)", "data.n_stories=10"],
]


@pytest.mark.parametrize("overrides", CASES)
def test_sweep_jobs_are_those_of_hydras_basic_sweeper(overrides):
    """The expansion is the basic sweeper's own (its product, its order, a key given twice
    keeping its last values), checked against Hydra's implementation."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    expected = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    assert sweep_jobs(overrides) == expected


def test_sweep_jobs_refuses_what_the_basic_sweeper_cannot_expand():
    with pytest.raises(ValueError, match="does not expand"):
        sweep_jobs(["scoring.seq_len=interval(1,2)"])


def _multirun(folder, task, subdir="${path_safe:${hydra.job.override_dirname}}"):
    cfg = OmegaConf.create({"hydra": {"overrides": {"task": task},
                                      "sweep": {"dir": str(folder), "subdir": subdir}}})
    (folder / "multirun.yaml").write_text(OmegaConf.to_yaml(cfg))


def test_missing_jobs_names_the_folders_multirun_yaml_lists(tmp_path):
    _multirun(tmp_path, ["n_heads=4,8", "condition=high"])
    present = {"condition=high,n_heads=4"}
    assert missing_jobs(tmp_path, present) == [("condition=high,n_heads=8", MISSING_FOLDER)]
    assert missing_jobs(tmp_path, present | {"condition=high,n_heads=8"}) == []


def test_missing_jobs_counts_where_folders_are_named_otherwise(tmp_path):
    _multirun(tmp_path, ["n_heads=4,8,16"], subdir="${hydra.job.num}")
    assert missing_jobs(tmp_path, {"0", "1"}) == [
        (str(tmp_path), "multirun.yaml lists 3 jobs, 2 folders were found")]
    assert missing_jobs(tmp_path, {"0", "1"}, count=False) == []
    assert missing_jobs(tmp_path, {"0", "1", "2"}) == []


def test_missing_jobs_without_a_readable_multirun_yaml(tmp_path):
    assert missing_jobs(tmp_path, set()) == []  # none
    (tmp_path / "multirun.yaml").write_text("hydra: {overrides: {task: ['n_heads=(']}}\n")
    assert missing_jobs(tmp_path, set()) == []  # another tool's: nothing can be checked

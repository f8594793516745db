"""Grouping comparable jobs (ih_sweep/report/groups.py): settings flattened and read from a
record, the share of a job, the families of groups that differ only in how heads are
ablated."""

from __future__ import annotations

import math

import numpy as np
from summary_jobs import make_job

from ih_sweep.report.discover import find_jobs
from ih_sweep.report.groups import (
    GROUP_KEYS,
    ablation_families,
    as_float,
    cell_groups,
    flat,
    group_title,
    settings_of,
    share,
)


def test_flat_dots_nested_keys():
    assert flat({"a": {"b": 1, "c": {"d": None}}, "e": [1]}) == {"a.b": 1, "a.c.d": None,
                                                                "e": [1]}
    assert flat({}) == {}


def test_as_float():
    assert as_float("0.5") == 0.5 and as_float(3) == 3.0
    assert math.isnan(as_float(None)) and math.isnan(as_float("n/a"))


def _settings(cond, method, **ablation):
    out = {"job": "evaluate", "n_heads": 4, "condition": cond, "model": {"name": "tiny"},
           "data": {"name": "babi_generated", "task": 1}, "eval": {"metric": "contains"}}
    if cond != "none":
        out |= {"scoring": {"rank_by": "prefix"}, "ablation": {"method": method, **ablation}}
    return out


def test_settings_of_a_record_without_settings_says_what_the_record_does(tmp_path):
    make_job(tmp_path, "high", 4, "high", [True, False])
    record = find_jobs(tmp_path).jobs[0].record
    assert settings_of(record) == {
        "model": {"name": "tiny"}, "quantization": {"name": "none"}, "data": record.data,
        "eval": record.eval, "ablation": {"method": "zero"}, "scoring": {"rank_by": "prefix"}}
    assert math.isnan(share(find_jobs(tmp_path).jobs[0]))  # asked a count


def test_ablation_families_label_the_methods_and_what_sets_them_apart(tmp_path):
    rng = np.random.default_rng(0)
    make_job(tmp_path, "none", 0, "none", rng.random(20) < 0.9,
             settings=_settings("none", None), config_hash="n")
    for method, extra in (("zero", {}), ("mean", {"n_reference": 64}),
                          ("mean2", {"n_reference": 128})):
        name = method.rstrip("2")
        for cond in ("high", "low"):
            make_job(tmp_path, f"{method}-{cond}", 4, cond, rng.random(20) < 0.5,
                     settings=_settings(cond, name, **extra), config_hash=f"{method}{cond}")
    groups, _ = cell_groups(find_jobs(tmp_path).jobs)
    assert len(groups) == 3
    (title, members), = ablation_families(groups)
    assert "ablation" not in title and title.startswith("model=tiny")
    assert sorted(label for label, _ in members) == [
        "mean (n_reference=128)", "mean (n_reference=64)", "zero"]
    assert all(set(g.cells) == {(0, "none", 0), (4, "high", 0), (4, "low", 0)}
               for _, g in members)
    assert ablation_families(groups[:1]) == []  # one group: no family


def test_group_title_names_every_group_key():
    group = {k: f"v{i}" for i, k in enumerate(GROUP_KEYS)}
    assert group_title(group) == ", ".join(f"{k}=v{i}" for i, k in enumerate(GROUP_KEYS))

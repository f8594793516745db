"""What the jobs of one process share (ih_sweep/pipeline/draws.py): the process memo of
items, prompt-length checks and tokenized rows."""

from __future__ import annotations

import pandas as pd
import pytest
from compose_config import run_job

from ih_sweep.evaluation import evaluator
from ih_sweep.pipeline import draws, stages

FAST = ("debug=fast",)


def test_memo_makes_each_value_once_and_keeps_the_most_recent():
    memo = draws.ProcessMemo(size=2)
    made = []

    def make(v):
        return lambda: made.append(v) or v

    assert memo.get(("a",), make("A")) == "A"
    assert memo.get(("a",), make("A2")) == "A"  # made once
    memo.get(("b",), make("B"))
    memo.get(("a",), make("A3"))  # used again: now the most recent
    memo.get(("c",), make("C"))  # over the size: the least recently used (b) goes
    assert memo.get(("b",), make("B2")) == "B2" and made == ["A", "B", "C", "B2"]


def test_a_failing_make_keeps_nothing():
    memo = draws.ProcessMemo()
    with pytest.raises(ValueError):
        memo.get(("x",), lambda: (_ for _ in ()).throw(ValueError("no")))
    assert memo.get(("x",), lambda: 1) == 1


def test_the_jobs_of_a_process_make_the_items_and_rows_once(tmp_path, monkeypatch):
    """A sweep's conditions evaluate the same items: the second job takes the first one's
    items and tokenized rows, and its results are what it computes alone."""
    calls = {"items": 0, "rows": 0}
    real_items, real_rows = stages.load_items, evaluator.build_rows

    def count_items(config):
        calls["items"] += 1
        return real_items(config)

    def count_rows(*args, **kwargs):
        calls["rows"] += 1
        return real_rows(*args, **kwargs)

    monkeypatch.setattr(draws, "load_items", count_items)
    monkeypatch.setattr(evaluator, "build_rows", count_rows)
    cache = f"paths.cache_dir={tmp_path}/cache"
    run_job(tmp_path / "high", *FAST, "n_heads=4", "condition=high", cache)
    assert calls == {"items": 1, "rows": 1}
    run_job(tmp_path / "low", *FAST, "n_heads=4", "condition=low", cache)
    assert calls == {"items": 1, "rows": 1}
    run_job(tmp_path / "other", *FAST, "n_heads=4", "condition=low", "data.seed=5", cache)
    assert calls == {"items": 2, "rows": 2}  # other stories: made afresh
    draws.PROCESS.clear()
    run_job(tmp_path / "low-alone", *FAST, "n_heads=4", "condition=low",
            f"paths.cache_dir={tmp_path}/cache2")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "low" / "results.csv"),
                                  pd.read_csv(tmp_path / "low-alone" / "results.csv"))


def test_items_key_names_what_makes_the_items():
    from compose_config import compose

    from ih_sweep.config.hydra import settings

    base = draws.items_key(settings(compose(*FAST)))
    assert base == draws.items_key(settings(compose(*FAST, "condition=low", "n_heads=8")))
    for override in ("data.seed=3", "data.n_stories=7", "eval.scope=all",
                     "eval.max_new_tokens=4"):
        assert draws.items_key(settings(compose(*FAST, override))) != base, override

"""Rankings with their uncertainty (issue #30 item 3): a high or low job records in
job.json how often its heads come back over bootstrap resamples of the samples its score
averages over (``rank_stability``), computed from the per-sample scores kept beside the
cached table; random and unablated jobs record none."""

from __future__ import annotations

import numpy as np
from compose_config import compose, run_job

from ih_sweep.config.hydra import settings
from ih_sweep.heads import score_table
from ih_sweep.heads import stability as st
from ih_sweep.heads.selection import select_heads
from ih_sweep.pipeline.records import read_record

FAST = ("debug=fast", "mechanism.enabled=false")


def test_a_high_job_records_its_sets_bootstrap_stability(tmp_path):
    record = run_job(tmp_path / "high", *FAST, "n_heads=4")
    got = record.rank_stability
    assert got == read_record(tmp_path / "high").rank_stability
    assert {k: got[k] for k in ("score", "over", "samples", "resamples", "threshold")} == \
        {"score": "prefix", "over": "sequences", "samples": 8, "resamples": st.RESAMPLES,
         "threshold": st.UNSTABLE_BELOW}
    config = settings(compose(*FAST, "n_heads=4", f"paths.cache_dir={tmp_path / 'cache'}"))
    samples = score_table.read_samples(score_table.cache_path(config), (2, 32))
    expected = st.top_n_stability(samples, lambda m: select_heads(m, "high", 4))
    assert got["mean_overlap"] == expected and 0 < expected <= 1
    assert got["unstable"] == (expected < st.UNSTABLE_BELOW)


def test_low_jobs_are_measured_random_and_none_are_not(tmp_path):
    low = run_job(tmp_path / "low", *FAST, "n_heads=4", "condition=low")
    assert low.rank_stability["score"] == "prefix"
    assert 0 < low.rank_stability["mean_overlap"] <= 1
    assert run_job(tmp_path / "random", *FAST, "n_heads=4", "condition=random"
                   ).rank_stability is None
    assert run_job(tmp_path / "none", *FAST, "condition=none").rank_stability is None


def test_an_fv_job_is_measured_over_its_prompts(tmp_path):
    record = run_job(tmp_path / "fv", *FAST, "n_heads=4", "scoring=fv")
    got = record.rank_stability
    assert (got["score"], got["over"], got["samples"]) == ("fv", "prompts", 4)
    assert np.isfinite(got["mean_overlap"])

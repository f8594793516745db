"""Several draws of a random null in one batch (``control.draws_per_pass``, issue #30 item
2): a K-draw job evaluating its distinct head sets D at a time (one head set a batch row)
records what the same job gives one draw at a time: every item's outcome, the counts, the
heads, the mechanism check; float measures within 1e-5, relative where larger than 1 (a
float32 logit difference of 12 is 1e-6 apart from its neighbours; another batch rounds
differently)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from compose_config import compose, run_job

from ih_sweep.config.errors import ConfigError
from ih_sweep.config.hydra import settings
from ih_sweep.config.identity import config_hash
from ih_sweep.pipeline.draws import SharedInputs
from ih_sweep.pipeline.records import SeedsRecord, read_record

K = 4
ARGS = ("debug=fast", "condition=random", "n_heads=8", f"control_seeds={K}",
        "data.n_stories=30", "eval.checkpoint_items=20", "mechanism.n_texts=8",
        "eval.batch_size=8")
FLOATS = ["margin", "gold_logprob", "logit_diff"]


def _draws(job: Path) -> list[tuple[pd.DataFrame, object]]:
    return [(pd.read_csv(job / f"control_seed={k}" / "results.csv", keep_default_na=False),
             read_record(job / f"control_seed={k}")) for k in range(K)]


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_draws_side_by_side_record_what_one_at_a_time_records(tmp_path, ablation):
    """K=4 draws, 30 stories in two checkpoint chunks: D=4 (all four in each batch) and D=3
    (a group of three, then the last alone) equal D=1, draw by draw."""
    one = run_job(tmp_path / "d1" / "job", *ARGS, f"ablation={ablation}",
                  f"paths.cache_dir={tmp_path}/c1")
    want = _draws(tmp_path / "d1" / "job")
    assert len({tuple(map(tuple, r.heads)) for _, r in want}) == K  # four different sets
    for d in (4, 3):
        job = tmp_path / f"d{d}" / "job"
        got_record = run_job(job, *ARGS, f"ablation={ablation}", f"control.draws_per_pass={d}",
                             f"paths.cache_dir={tmp_path}/c{d}")
        assert isinstance(got_record, SeedsRecord) and "batches" in got_record.shared
        assert got_record.seed_hashes == one.seed_hashes  # a speed key: same jobs
        assert got_record.accuracies == one.accuracies
        for (got, got_rec), (ref, ref_rec) in zip(_draws(job), want):
            exact = [c for c in got.columns if c not in FLOATS]
            pd.testing.assert_frame_equal(got[exact], ref[exact])
            np.testing.assert_allclose(got[FLOATS].to_numpy(float),
                                       ref[FLOATS].to_numpy(float), rtol=1e-5, atol=1e-5)
            for key in ("config_hash", "settings", "heads", "n_correct", "mechanism",
                        "control_seed", "same_heads_as"):
                assert getattr(got_rec, key) == getattr(ref_rec, key), key


def test_the_key_is_a_speed_key_and_validated():
    def cfg(*o):
        return settings(compose(*o))
    base = ("condition=random", "control_seeds=4")
    assert config_hash(cfg(*base, "control.draws_per_pass=8")) == config_hash(cfg(*base))
    assert cfg(*base).control.draws_per_pass == 1
    with pytest.raises(ConfigError, match=r"^control.draws_per_pass=0 is not allowed; "
                                          r"allowed: an integer >= 1$"):
        cfg(*base, "control.draws_per_pass=0")
    assert cfg(*base, "ablation=position_mean", "control.draws_per_pass=2")
    with pytest.raises(ConfigError) as err:
        cfg(*base, "ablation=resample", "control.draws_per_pass=2")
    assert str(err.value) == (
        "control.draws_per_pass=2 is not allowed; allowed with ablation.method=resample: 1 "
        "(draws share a batch with ablation.method=zero, mean, position_mean: resample fills "
        "each row by its story)")


class _Selection:
    def __init__(self, heads, table):
        self.heads, self.table = heads, table

    def heads_for(self, seed):
        if self.table[seed] is None:
            from ih_sweep.config.errors import UserError
            raise UserError("no match")
        return self.table[seed]


def test_batch_mates_are_the_next_distinct_unevaluated_sets():
    from ih_sweep.ablation.registry import get_ablation

    table = {0: [(0, 1)], 1: [(0, 2)], 2: [(0, 1)], 3: [(0, 2)], 4: [(1, 1)], 5: None,
             6: [(1, 2)]}
    config = settings(compose("condition=random", "control_seeds=7",
                              "control.draws_per_pass=4"))
    shared = SharedInputs(pending=list(range(7)))
    zero = get_ablation("zero")
    # set of 0 again (2) and of 1 again (3) skipped; a draw that cannot be drawn (5) ends it
    assert shared.batch_mates(config, _Selection(table[0], table), zero) == [[(0, 2)], [(1, 1)]]
    shared.ahead[frozenset([(0, 2)])] = {0: "frame"}
    assert shared.batch_mates(config, _Selection(table[0], table), zero) == [[(1, 1)]]
    assert shared.take_ahead([(0, 2)], 0) == "frame" and shared.take_ahead([(0, 2)], 0) is None
    assert shared.batch_mates(config, _Selection(table[0], table), get_ablation("resample")) \
        == []
    one = settings(compose("condition=random", "control_seeds=7"))
    assert shared.batch_mates(one, _Selection(table[0], table), zero) == []

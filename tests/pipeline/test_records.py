"""The job record and column definitions shared by the jobs (writer) and the summary."""

from __future__ import annotations

import dataclasses

import pytest

from ih_sweep.io_utils import read_json, write_json
from ih_sweep.pipeline.records import (
    COMPLETE,
    RESULT_COLUMNS,
    SEAL,
    EvaluationRecord,
    RecordError,
    ScanRecord,
    finished_record,
    read_record,
    sha256,
    write_record,
)


def _record(**kw) -> EvaluationRecord:
    base = dict(config_hash="abc", n_heads=4, condition="high", control_seed=0, model="tiny",
                quantization="none", data={"name": "babi_generated", "task": 1},
                eval={"metric": "contains", "scope": "last", "max_new_tokens": 3},
                ablation="zero", rank_by="prefix", n_items=2, n_correct=1, accuracy=0.5,
                n_decoded=0, heads=[[1, 2]])
    return EvaluationRecord(**{**base, **kw})


def test_records_round_trip_by_kind(tmp_path):
    write_record(tmp_path / "a", _record())
    assert read_record(tmp_path / "a") == _record()
    scan = ScanRecord(config_hash="x", model="tiny", layers=[0, 1], n_items=3,
                      rank_by="prefix", stats={"rho": 0.5})
    write_record(tmp_path / "b", scan)
    assert read_record(tmp_path / "b") == scan
    assert (tmp_path / "a" / "job.json").stat().st_size > 0


@pytest.mark.parametrize("text,why", [
    ("{not json", "not JSON"), ("[1, 2]", "not a job record"),
    ('{"job": "dance"}', "unknown job kind 'dance'"),
    ('{"job": "evaluate", "n_heads": 4}', "incomplete record"),
    ("\udcff".encode("utf-8", "surrogateescape").decode("latin-1"), "not JSON"),
])
def test_damaged_records_are_refused_with_the_reason(tmp_path, text, why):
    (tmp_path / "job.json").write_text(text, encoding="latin-1")
    with pytest.raises(RecordError, match=why):
        read_record(tmp_path)


def test_missing_record(tmp_path):
    with pytest.raises(RecordError, match="no job record"):
        read_record(tmp_path)


def _files(folder, correct=(True, False), heads=((1, 2),)):
    import pandas as pd

    names = ["story", "question_index", "line", "examples_before", "answer", "continuation",
             "correct", "decided_by", "n_heads", "condition", "control_seed", "model",
             "quantization", "data", "babi_task", "split", "metric", "scope", "ablation"]
    rows = [dict(zip(names, [i, 0, 5, 0, "office", "office" if c else "garden", c, "forward",
                             4, "high", 0, "tiny", "none", "babi_generated", 1, "generated",
                             "contains", "last", "zero"])) for i, c in enumerate(correct)]
    # the measure columns (margin, ...) are 0 here
    pd.DataFrame(rows).reindex(columns=RESULT_COLUMNS, fill_value=0).to_csv(
        folder / "results.csv", index=False)
    pd.DataFrame([(la, h, 0.5, "prefix") for la, h in heads],
                 columns=["layer", "head", "score", "rank_by"]).to_csv(folder / "heads.csv",
                                                                       index=False)


def test_a_finished_job_needs_its_hash_status_and_output(tmp_path):
    write_record(tmp_path, _record())
    assert finished_record(tmp_path, "abc", "results.csv") is None  # no output yet
    _files(tmp_path)
    done = _record(results_sha256=sha256(tmp_path / "results.csv"))
    write_record(tmp_path, done)
    assert finished_record(tmp_path, "abc", "results.csv") == done
    assert finished_record(tmp_path, "other", "results.csv") is None
    write_record(tmp_path, dataclasses.replace(done, status="failed"))
    assert finished_record(tmp_path, "abc", "results.csv") is None
    assert COMPLETE == "complete"


@pytest.mark.parametrize("edit,why", [
    (lambda r: r | {"results_sha256": ""}, "no checksum of results.csv"),
    (lambda r: {k: v for k, v in r.items() if k != "results_sha256"},
     "no checksum of results.csv"),
    (lambda r: r | {"mechanism": {"repeat_loss": 9.0}}, "record checksum"),
    (lambda r: r | {"scores_file": "elsewhere.csv"}, "record checksum"),
    (lambda r: {k: v for k, v in r.items() if k != SEAL}, "no record checksum"),
])
def test_an_edited_record_is_not_a_finished_job(tmp_path, caplog, edit, why):
    """Every field of job.json is covered by its seal, and a record without a checksum of
    its results is damaged, not "unchecked"."""
    _files(tmp_path)
    write_record(tmp_path, _record(results_sha256=sha256(tmp_path / "results.csv"),
                                   mechanism={"repeat_loss": 1.0}))
    assert finished_record(tmp_path, "abc") is not None
    write_json(tmp_path / "job.json", edit(read_json(tmp_path / "job.json")))
    assert finished_record(tmp_path, "abc") is None
    assert why in caplog.text


def test_result_columns_are_documented_in_the_module():
    import ih_sweep.pipeline.records as records

    for column in RESULT_COLUMNS:
        assert column in records.__doc__, column

"""A finished job, and a score table, are reused only for the same inputs by content: a
bAbI file rewritten at the same path, a local model folder whose tokenizer or generation
config changed, a model path that is a symlink re-pointed to another folder, all make the
job run again (the config hash, which names the job, stays what it was); and an edited
job.json is damage, neither reused nor summarized."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from compose_config import run_job

from ih_sweep.data import generate_stories
from ih_sweep.io_utils import read_json, write_json
from ih_sweep.model.loading import ASSET_DIR
from ih_sweep.pipeline.records import read_record, store_dir

FAST = ("debug=fast", "mechanism.enabled=false")
BABI_NAME = "qa1_single-supporting-fact_test.txt"


def write_babi(path: Path, n_stories: int = 8, answer: str | None = None) -> None:
    """Generated task-1 stories in the release's text format; ``answer``: every question's
    gold answer replaced by it."""
    lines = []
    for story in generate_stories(n_stories, seed=5):
        for line_id, kind, text, support, gold in zip(story["id"], story["type"], story["text"],
                                                      story["supporting_ids"], story["answer"]):
            if kind:
                lines.append(f"{line_id} {text}\t{answer or gold}\t{' '.join(support)}")
            else:
                lines.append(f"{line_id} {text}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _data(root: Path) -> tuple[str, ...]:
    return ("data=babi_files", f"data.path={root}", "data.lang=en", "data.split=test")


def test_a_babi_file_rewritten_at_the_same_path_is_evaluated_again(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    babi = tmp_path / "babi"
    write_babi(babi / "en" / BABI_NAME)
    args = (*FAST, "condition=none", *_data(babi), f"paths.cache_dir={tmp_path / 'c'}")
    first = run_job(tmp_path / "a", *args)
    assert first.accuracy > 0
    write_babi(babi / "en" / BABI_NAME, answer="nowhere")  # no continuation holds it
    caplog.clear()
    again = run_job(tmp_path / "a", *args)  # the same folder: its job is not skipped
    assert again.config_hash == first.config_hash
    assert not again.reused_evaluation and again.accuracy == 0
    assert f"its input changed since it ran: data/en/{BABI_NAME}" in caplog.text
    assert set(first.inputs) == set(again.inputs) == {f"data/en/{BABI_NAME}"}
    write_babi(babi / "en" / BABI_NAME)  # back as it was, then rewritten once more:
    run_job(tmp_path / "b", *args)
    write_babi(babi / "en" / BABI_NAME, answer="nowhere")
    other = run_job(tmp_path / "b2", *args)  # a new folder: the store's job is not restored
    assert not other.reused_evaluation and other.accuracy == 0


def _model_copy(folder: Path) -> Path:
    shutil.copytree(ASSET_DIR, folder)
    return folder


def test_a_changed_tokenizer_file_in_a_local_model_folder_is_not_reused(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    model = _model_copy(tmp_path / "model")
    args = (*FAST, "n_heads=4", f"model.path={model}", f"paths.cache_dir={tmp_path / 'c'}")
    first = run_job(tmp_path / "a", *args)
    assert run_job(tmp_path / "b", *args).reused_evaluation  # unchanged: reused
    with open(model / "tokenizer_config.json", "a") as fh:
        fh.write("\n")
    caplog.clear()
    again = run_job(tmp_path / "c", *args)
    assert again.config_hash == first.config_hash and not again.reused_evaluation
    assert "model/tokenizer_config.json" in caplog.text
    assert "reusing scores" not in caplog.text  # the score table is computed again too
    assert again.scores_file != first.scores_file


def test_a_re_pointed_model_symlink_is_not_reused(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    one = _model_copy(tmp_path / "one")
    two = _model_copy(tmp_path / "two")
    with open(two / "generation_config.json", "a") as fh:
        fh.write("\n")
    link = tmp_path / "model"
    link.symlink_to(one, target_is_directory=True)
    args = (*FAST, "condition=none", f"model.path={link}", f"paths.cache_dir={tmp_path / 'c'}")
    first = run_job(tmp_path / "a", *args)
    link.unlink()
    link.symlink_to(two, target_is_directory=True)
    caplog.clear()
    again = run_job(tmp_path / "b", *args)
    assert again.config_hash == first.config_hash and not again.reused_evaluation
    assert "model/generation_config.json" in caplog.text


@pytest.mark.parametrize("edit,why", [
    (lambda r: r | {"mechanism": r["mechanism"] | {"repeat_loss": 0.01}}, "record checksum"),
    (lambda r: r | {"results_sha256": ""}, "no checksum of results.csv"),
])
def test_an_edited_job_record_is_redone_and_left_out_of_the_summary(tmp_path, caplog, edit,
                                                                     why):
    from ih_sweep.report.discover import find_jobs

    caplog.set_level(logging.INFO)
    args = ("debug=fast", "n_heads=4", "mechanism.n_sequences=2", "mechanism.n_texts=4",
            f"paths.cache_dir={tmp_path / 'c'}")
    first = run_job(tmp_path / "s" / "job", *args)
    assert first.mechanism["repeat_loss"] is not None
    for folder in (tmp_path / "s" / "job", store_dir(tmp_path / "c", first.config_hash)):
        write_json(folder / "job.json", edit(read_json(folder / "job.json")))
    found = find_jobs(tmp_path / "s")
    assert found.jobs == [] and len(found.problems) == 1 and why in found.problems[0][1]
    caplog.clear()
    again = run_job(tmp_path / "s" / "job", *args)
    assert "redoing" in caplog.text and why in caplog.text
    assert not again.reused_evaluation and "skipping" not in caplog.text
    assert again.mechanism == first.mechanism and read_record(tmp_path / "s" / "job") == again
    assert [j.path.name for j in find_jobs(tmp_path / "s").jobs] == ["job"]


def test_a_score_file_rewritten_at_the_same_path_chooses_the_heads_again(tmp_path, caplog):
    import pandas as pd

    caplog.set_level(logging.INFO)
    cache = f"paths.cache_dir={tmp_path / 'c'}"
    computed = run_job(tmp_path / "scored", *FAST, "n_heads=4", cache)
    scores = tmp_path / "scores.csv"
    shutil.copyfile(computed.scores_file, scores)
    args = (*FAST, "n_heads=4", "scoring.source=file", f"scoring.file={scores}", cache)
    first = run_job(tmp_path / "a", *args)
    table = pd.read_csv(scores)
    table.assign(prefix=-table["prefix"]).to_csv(scores, index=False)  # the lowest first
    caplog.clear()
    again = run_job(tmp_path / "b", *args)
    assert again.config_hash == first.config_hash and not again.reused_evaluation
    assert "scores/scores.csv" in caplog.text and again.heads != first.heads


def test_a_scan_of_a_changed_model_folder_is_not_skipped(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    model = _model_copy(tmp_path / "model")
    args = ("debug=fast", "job=scan", "scan.layers=[0]", "scan.n_stories=4",
            "scan.repeat_sequences=2", f"model.path={model}")
    first = run_job(tmp_path / "scan", *args)
    caplog.clear()
    assert run_job(tmp_path / "scan", *args) == first  # unchanged: skipped
    assert "skipping" in caplog.text
    with open(model / "tokenizer.json", "a") as fh:
        fh.write("\n")
    caplog.clear()
    again = run_job(tmp_path / "scan", *args)
    assert "skipping" not in caplog.text and "model/tokenizer.json" in caplog.text
    assert again.inputs != first.inputs

"""The job recipes run in-process on configs composed with Hydra's compose API (debug=fast:
20 generated stories), and what they leave behind is checked before it is reused."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest
from compose_config import CONF, compose, run_job
from omegaconf import OmegaConf

from ih_sweep.pipeline.records import ITEM_COLUMNS, RESULT_COLUMNS, read_record

FAST = ("debug=fast",)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob(
    "*.yaml")))
def test_every_experiment_runs_on_the_tiny_model(tmp_path, experiment):
    """Each experiment with the tiny model and generated data in place of its model and
    data: every condition it sweeps runs and writes its files."""
    tiny = ("model=tiny", "quantization=none", "data=babi_generated", "scoring=prefix", *FAST)
    swept = compose(f"experiment={experiment}", return_hydra_config=True)
    params = OmegaConf.select(swept, "hydra.sweeper.params") or {}
    conditions = str(params.get("condition", swept.condition)).split(",")
    for condition in conditions:
        out = tmp_path / condition
        record = run_job(out, f"experiment={experiment}", *tiny, f"condition={condition}")
        assert record.n_items == 20 and record.condition in (condition, "none")
        assert list(pd.read_csv(out / "results.csv").columns) == RESULT_COLUMNS


def test_a_finished_job_is_reused_from_the_store_in_a_new_folder(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    first = run_job(tmp_path / "a" / "job", *FAST, "n_heads=4", f"paths.cache_dir={tmp_path}/c")
    caplog.clear()
    again = run_job(tmp_path / "b" / "job", *FAST, "n_heads=4", "eval.batch_size=3",
                    f"paths.cache_dir={tmp_path}/c")
    assert f"reusing the finished evaluation {first.config_hash}" in caplog.text
    assert again.reused_evaluation and not first.reused_evaluation
    assert dataclasses.replace(again, reused_evaluation=False, timings=first.timings) == first
    assert read_record(tmp_path / "b" / "job") == again
    for name in ("results.csv", "heads.csv"):
        assert (tmp_path / "a/job" / name).read_bytes() == (tmp_path / "b/job" / name).read_bytes()


def _damage_results(folder: Path, how: str) -> None:
    results = folder / "results.csv"
    df = pd.read_csv(results, keep_default_na=False)
    if how == "truncated":
        results.write_text(results.read_text()[: len(results.read_text()) // 2])
    elif how == "emptied":
        results.write_text("")
    elif how == "flipped":
        df.loc[0, "correct"] = not df.loc[0, "correct"]
        df.to_csv(results, index=False)
    elif how == "duplicated":
        pd.concat([df, df.head(1)]).to_csv(results, index=False)
    elif how == "heads deleted":
        (folder / "heads.csv").unlink()
    elif how == "record garbage":
        (folder / "job.json").write_text("{garbage")
    elif how == "record says another accuracy":
        record = json.loads((folder / "job.json").read_text())
        record["accuracy"] = 0.1
        (folder / "job.json").write_text(json.dumps(record))
    elif how == "record says more correct":
        record = json.loads((folder / "job.json").read_text())
        record["n_correct"] += 1
        (folder / "job.json").write_text(json.dumps(record))


@pytest.mark.parametrize("how,why", [
    ("truncated", "checksum"), ("emptied", "checksum"), ("flipped", "checksum"),
    ("duplicated", "checksum"), ("heads deleted", "heads.csv is missing"),
    ("record garbage", "not JSON"), ("record says more correct", "correct, job.json says"),
    ("record says another accuracy", "job.json's accuracy 0.1 is not"),
])
def test_a_damaged_finished_job_is_redone_and_says_why(tmp_path, caplog, how, why):
    caplog.set_level(logging.INFO)
    out = tmp_path / "job"
    args = (*FAST, "n_heads=4", "paths.cache_dir=" + str(tmp_path / "c"))
    first = run_job(out, *args)
    clean = pd.read_csv(out / "results.csv", keep_default_na=False)
    # damage the store's copy the same way, so the rerun cannot restore from it either
    store = tmp_path / "c" / "jobs" / first.config_hash
    _damage_results(out, how)
    _damage_results(store, how)
    caplog.clear()
    again = run_job(out, *args)
    assert f"redoing {out}" in caplog.text and why in caplog.text
    assert "skipping" not in caplog.text
    assert again.n_correct == first.n_correct
    # the float measures (margin, gold_logprob, logit_diff) may differ in float32's last bits:
    # the CPU kernels' blocking follows memory alignment, which differs between the two runs
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv", keep_default_na=False),
                                  clean, check_exact=False, rtol=0, atol=1e-4)
    assert read_record(out) == again


def test_run_time_config_error_names_the_key(tmp_path):
    from ih_sweep.config.errors import ConfigError

    with pytest.raises(ConfigError, match=r"n_heads=65 is larger than the model's 64 heads"):
        run_job(tmp_path / "job", *FAST, "n_heads=65")


def test_score_job_says_where_it_wrote(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_job(tmp_path / "score", *FAST, "job=score")
    assert (tmp_path / "score" / "scores.csv").is_file()
    assert f"wrote {tmp_path / 'score' / 'scores.csv'}" in caplog.text


def test_compose_of_the_debug_group():
    cfg = compose(*FAST)
    assert cfg.data.n_stories == 20 and cfg.eval.progress is False


@pytest.mark.parametrize("how,why", [
    ("garbage", "it does not have the item columns"),
    ("short", "it holds 5 rows, not the chunk's 10 items once each"),
    ("duplicated", "it holds 11 rows"),
])
def test_a_damaged_checkpoint_chunk_is_redone(tmp_path, caplog, how, why):
    """A killed job's checkpointed chunk is used on the rerun only if it holds exactly its
    items; a damaged one is evaluated again (and the job's result is complete)."""
    caplog.set_level(logging.WARNING)
    args = (*FAST, "n_heads=4", "eval.checkpoint_items=10", f"paths.cache_dir={tmp_path}/c")
    clean = run_job(tmp_path / "clean", *args)
    out = tmp_path / "job"
    part = out / "partial"
    part.mkdir(parents=True)
    chunk = pd.read_csv(tmp_path / "clean" / "results.csv",
                        keep_default_na=False)[ITEM_COLUMNS].iloc[:10]
    bad = {"garbage": pd.DataFrame({"x": [1]}), "short": chunk.head(5),
           "duplicated": pd.concat([chunk, chunk.head(1)])}[how]
    bad.to_csv(part / "chunk-00000.csv", index=False)
    from ih_sweep.io_utils import write_json

    write_json(part / "state.json", {"config_hash": clean.config_hash, "chunk_items": 10,
                                     "n_items": 20})
    shutil.rmtree(tmp_path / "c" / "jobs")  # no stored copy: the job must run
    record = run_job(out, *args)
    assert why in caplog.text
    assert record.n_items == 20 and record.n_correct == clean.n_correct


def test_prompts_longer_than_the_model_are_refused_before_evaluating(tmp_path):
    """A GPT-2-layout model with 128 positions and the tiny tokenizer: bAbI prompts of
    ~150 tokens do not fit, and the job says so in one line instead of an IndexError."""
    import shutil as sh

    from transformers import GPT2Config, GPT2LMHeadModel

    from ih_sweep.evaluation.evaluator import PromptTooLong
    from ih_sweep.model.loading import ASSET_DIR

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=296, n_positions=128, n_embd=32, n_layer=1,
                               n_head=2, bos_token_id=1, eos_token_id=2)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        sh.copy(ASSET_DIR / name, folder / name)
    with pytest.raises(PromptTooLong, match=r"the prompt has \d+ tokens and "
                                            r"eval.max_new_tokens=3 more are generated, but "
                                            r"the model takes 128 positions"):
        run_job(tmp_path / "job", *FAST, "model=hub", f"model.path={folder}",
                "condition=none")
    assert not (tmp_path / "job" / "results.csv").exists()

"""ablation=knockout (ih_sweep.ablation.knockout; the edges: tests/model/test_edges.py)
through every pass the evaluator and the mechanism check run: the teacher-forced pass (a
shared header run once, then copied to every row), decoding from its cache (rows selected),
the generate fallback, each equal to one-story-at-a-time ``generate`` under the knockout;
the config group, its hash and its refusals; a job's record."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ih_sweep import data
from ih_sweep.ablation.hooks import AblationError, ablate_heads
from ih_sweep.config.schema import EvalConfig
from ih_sweep.evaluation import runner
from ih_sweep.evaluation.evaluator import evaluate, is_correct
from ih_sweep.heads.selection import select_heads
from ih_sweep.testing import generate_one_at_a_time


def _wrong_teacher(items, tok):
    """The items with another story's answer as gold, so that greedy decoding leaves the
    teacher at once and every item is decided past the teacher-forced pass."""
    answers = sorted({it.answer for it in items})
    return [dataclasses.replace(it, answer=next(a for a in answers if a != it.answer))
            for it in items]


@pytest.mark.parametrize("mode", ["mask", "zero"])
def test_evaluator_paths_equal_one_at_a_time_generate(tiny, tiny_prefix, mode, monkeypatch):
    """scope=all on 6 stories (several items a row, a shared header), teachers that greedy
    decoding leaves: the cache-decoding path, the generate path and batch size 1 give the
    same continuations, each equal to one-at-a-time generate under the knockout, and not
    the unablated ones."""
    model, tok = tiny
    heads = select_heads(tiny_prefix, "high", 16)
    items = _wrong_teacher(data.make_items(data.generate_stories(60, seed=31)[:6], "all"), tok)
    settings = EvalConfig(progress=False, batch_size=5)
    plain = evaluate(model, tok, items, settings)
    with ablate_heads(model, heads, "knockout", mode):
        cached = evaluate(model, tok, items, settings)
        one = evaluate(model, tok, items, EvalConfig(progress=False, batch_size=1))
        ref = [generate_one_at_a_time(model, tok, it) for it in items]
        monkeypatch.setattr(runner, "reusable_cache", lambda *a: None)
        fallback = evaluate(model, tok, items, settings)
    assert {r.decided_by for r in cached} == {"decode"}
    assert {r.decided_by for r in fallback} == {"generate"}
    for got in (cached, one, fallback):
        assert [r.continuation for r in got] == ref
    assert [r.gold_logprob for r in cached] == pytest.approx([r.gold_logprob for r in one],
                                                              abs=1e-4)
    assert [r.gold_logprob for r in cached] != pytest.approx([r.gold_logprob for r in plain],
                                                              abs=1e-3)
    for r, c in zip(cached, ref):
        assert r.correct == is_correct(c, r.item.answer, "contains")


def test_knockout_is_not_zero_ablation_and_comes_off(tiny, tiny_prefix):
    model, tok = tiny
    heads = select_heads(tiny_prefix, "high", 8)
    ids = torch.tensor([tok(data.make_items(data.generate_stories(2, seed=3))[0].prompt)
                        ["input_ids"]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with ablate_heads(model, heads, "knockout"):
            knocked = model(input_ids=ids).logits
        with ablate_heads(model, heads, "zero"):
            zero = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert not torch.allclose(knocked, plain, atol=1e-3)
    assert not torch.allclose(knocked, zero, atol=1e-3)
    assert torch.equal(after, plain)


def test_a_bad_mode_is_refused():
    with pytest.raises(AblationError, match="ablation.knockout='soft'; allowed values: mask, "
                                            "zero"):
        from ih_sweep.ablation.registry import get_ablation

        get_ablation("knockout").check_fill("soft", [(0, 0)])


def test_mechanism_check_measures_the_knockout(tiny, tiny_prefix):
    """On repeated random sequences the knockout of the top induction heads takes away what
    the repeat buys (the repeat loss rises by nats)."""
    from ih_sweep.config.schema import MechanismConfig
    from ih_sweep.pipeline.mechanism import mechanism_check, reset, texts_for

    model, tok = tiny
    reset()
    texts = texts_for(data.generate_stories(4, seed=2), 4)
    heads = select_heads(tiny_prefix, "high", 8)
    got = mechanism_check(model, tok, MechanismConfig(n_sequences=4, n_texts=4), texts, heads,
                          "knockout", "mask")
    assert got["repeat_loss"] > got["repeat_loss_unablated"] + 2


# --------------------------------------------------------------------------- config and job
def test_config_group_and_hash():
    from compose_config import compose

    from ih_sweep.config.hydra import settings
    from ih_sweep.config.identity import config_hash, semantic_config

    cfg = settings(compose("ablation=knockout"))
    assert cfg.ablation.method == "knockout" and str(cfg.ablation.knockout) == "mask"
    assert "knockout" not in semantic_config(compose())["ablation"]  # others hash as before
    assert config_hash(compose("ablation=zero", "ablation.knockout=zero")) == \
        config_hash(compose())
    assert config_hash(compose("ablation=knockout", "ablation.knockout=zero")) != \
        config_hash(compose("ablation=knockout"))
    assert config_hash(compose("ablation=knockout")) != config_hash(compose())


def test_a_bad_knockout_value_names_key_value_and_allowed():
    """Refused at compose time (the CLI prints it as one line, as every enum's)."""
    from compose_config import compose
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose("ablation=knockout", "ablation.knockout=soft")
    lines = [line.strip() for line in str(err.value.__cause__).splitlines()]
    assert lines[0] == "Invalid value 'soft', expected one of [mask, zero]"
    assert "full_key: ablation.knockout" in lines


def test_another_attention_implementation_is_refused_before_any_job():
    from compose_config import compose

    from ih_sweep.config.errors import ConfigError
    from ih_sweep.config.hydra import settings

    with pytest.raises(ConfigError, match=r"^ablation.method='knockout' is not allowed; knockout "
                                          r"runs with model.attn_implementation=eager or sdpa "
                                          r".*not flash_attention_2$") as err:
        settings(compose("ablation=knockout", "model.attn_implementation=flash_attention_2"))
    assert "\n" not in str(err.value)
    settings(compose("ablation=knockout", "model.attn_implementation=eager"))


def test_a_job_records_the_method(tmp_path):
    import json

    import pandas as pd
    from compose_config import run_job

    out = tmp_path / "knockout"
    record = run_job(out, "debug=fast", "n_heads=8", "ablation=knockout",
                     f"paths.cache_dir={tmp_path}/cache")
    assert record.ablation == "knockout" and record.n_items == 20
    assert set(pd.read_csv(out / "results.csv")["ablation"]) == {"knockout"}
    job = json.loads((out / "job.json").read_text())
    mech = job["mechanism"]
    assert mech["repeat_loss"] > mech["repeat_loss_unablated"]

"""The mechanism check: its arithmetic on hand-built losses, its effect on the tiny model
(top-16 induction heads vs the layer-matched control), and its place in a job's record."""

from __future__ import annotations

import json
import math

import pytest
import torch
from compose_config import compose, run_job

from ih_sweep.config.errors import ConfigError
from ih_sweep.config.hydra import settings
from ih_sweep.config.identity import config_hash
from ih_sweep.config.schema import MechanismConfig
from ih_sweep.data import generate_stories, iter_lm_text, question_indices
from ih_sweep.heads.selection import select_heads
from ih_sweep.pipeline import mechanism as M


def test_token_losses_are_the_next_token_cross_entropy():
    """Position t holds -log softmax(logits[t-1])[ids[t]]; position 0 has no prediction."""
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3] * 3]]))
    ids = torch.tensor([[2, 0, 1]])
    loss = M.token_losses(logits, ids)
    assert math.isnan(loss[0, 0])
    assert loss[0, 1].item() == pytest.approx(-math.log(0.5))
    assert loss[0, 2].item() == pytest.approx(-math.log(0.8))


def test_icl_score_is_late_minus_early_averaged_over_texts():
    """Olsson et al.: loss at the late index minus loss at the early index, mean over texts;
    windows average each text's positions first."""
    nan = float("nan")
    losses = torch.tensor([[nan, 4.0, 3.0, 2.0, 1.0, 0.5],
                           [nan, 6.0, 5.0, 1.0, 2.0, 3.0]])
    assert M.icl_score(losses, 1, 5) == pytest.approx(((0.5 - 4) + (3 - 6)) / 2)
    assert M.icl_score(losses, range(1, 3), range(4, 6)) == pytest.approx(
        ((0.75 - 3.5) + (2.5 - 5.5)) / 2)
    with pytest.raises(ValueError, match="early"):
        M.icl_score(losses, 3, 3)
    with pytest.raises(ValueError):
        M.icl_score(losses, 0, 5)  # index 0 has no loss


def test_icl_positions_keep_olssons_ratio():
    assert M.icl_positions(501) == (50, 500)  # the paper's tokens in a 501-token context
    assert M.icl_positions(101) == (10, 100)
    assert M.icl_positions(3) == (1, 2)
    with pytest.raises(ValueError, match="too short"):
        M.icl_positions(2)
    early, late = M.icl_windows(101)
    assert (list(early), list(late)) == (list(range(5, 15)), list(range(91, 101)))
    assert M.icl_windows(101, 1) == (range(10, 11), range(100, 101))
    with pytest.raises(ValueError, match="overlap"):
        M.icl_windows(20, 15)


def test_masked_mean_and_story_text():
    assert M.masked_mean(torch.tensor([[1.0, 2.0, 3.0]]),
                         torch.tensor([[False, True, True]])) == pytest.approx(2.5)
    with pytest.raises(ValueError):
        M.masked_mean(torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.bool))
    story = generate_stories(1, seed=3)[0]
    text = M.story_text(story)
    lines = text.splitlines()
    assert len(lines) == len(story["text"]) and "Read the following" not in text
    assert lines[-1] == f"{story['text'][-1]} {story['answer'][-1]}"


def test_repeat_inputs_score_the_repeated_half(tiny):
    _, tok = tiny
    ids, mask = M.repeat_inputs(tok, MechanismConfig(n_sequences=3, seq_len=7))
    assert ids.shape == (3, 1 + 14) and (ids[:, 0] == tok.bos_token_id).all()
    assert torch.equal(ids[:, 1:8], ids[:, 8:]) and int(mask.sum()) == 3 * 7
    assert mask[:, 8:].all() and not mask[:, :8].any()
    with pytest.raises(ConfigError, match="mechanism.seq_len"):
        M.repeat_inputs(tok, MechanismConfig(seq_len=600), limit=1024)
    with pytest.raises(ConfigError, match="mechanism.seq_len"):
        M.repeat_inputs(tok, MechanismConfig(seq_len=400), limit=None)  # > candidates


@pytest.fixture(scope="module")
def texts():
    return M.texts_for(generate_stories(16, seed=0), 16)


@pytest.mark.parametrize("seed", [1000, 7])
def test_induction_heads_carry_the_repeat_loss_and_the_control_does_not(tiny, tiny_prefix,
                                                                        texts, seed):
    """N=16 on the tiny model: ablating the top heads raises the repeat loss by nats
    (>10 on seeds 0-2 and 1000), the layer-matched lowest heads by hundredths; the
    assertion leaves a margin of orders of magnitude."""
    model, tok = tiny
    cfg = MechanismConfig(seed=seed, n_sequences=8)
    high = M.mechanism_check(model, tok, cfg, texts, select_heads(tiny_prefix, "high", 16))
    low = M.mechanism_check(model, tok, cfg, texts, select_heads(tiny_prefix, "low", 16))
    assert high["repeat_loss_unablated"] == low["repeat_loss_unablated"] < 1.0
    rise_high = high["repeat_loss"] - high["repeat_loss_unablated"]
    rise_low = low["repeat_loss"] - low["repeat_loss_unablated"]
    assert rise_high > 3.0
    assert rise_high > 20 * max(rise_low, 0.01)
    # the ICL score: later text is predicted better unablated; the top heads take that away
    assert high["icl_score_unablated"] < -1.0
    assert high["icl_score"] - high["icl_score_unablated"] > \
        5 * abs(low["icl_score"] - low["icl_score_unablated"])


def test_no_heads_means_ablated_equals_unablated(tiny, texts):
    model, tok = tiny
    out = M.mechanism_check(model, tok, MechanismConfig(n_sequences=4), texts, [])
    assert out["repeat_loss"] == out["repeat_loss_unablated"]
    assert out["icl_score"] == out["icl_score_unablated"]
    assert out["n_sequences"] == 4 and out["icl_texts"] == 16
    assert out["icl_early"] < out["icl_late"] == out["icl_context_tokens"] - 1


def test_the_unablated_pass_runs_once_per_model_and_settings(tiny, texts, monkeypatch):
    model, tok = tiny
    calls = []
    real = M.measure
    monkeypatch.setattr(M, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    M.reset()
    cfg = MechanismConfig(n_sequences=2, seed=5)
    M.mechanism_check(model, tok, cfg, texts, [(0, 1)], model_key="k")
    M.mechanism_check(model, tok, cfg, texts, [(1, 2)], model_key="k")
    assert len(calls) == 3  # unablated once, then one ablated pass per job
    M.mechanism_check(model, tok, MechanismConfig(n_sequences=2, seed=6), texts, [],
                      model_key="k")
    assert len(calls) == 4


def test_the_inputs_are_built_once_per_model_settings_and_texts(tiny, texts, monkeypatch):
    """Tokenizing the texts and finding each answer (hundreds of tokenizer calls) is done
    with the unablated pass, once; each later job reuses both."""
    model, tok = tiny
    built = []
    real = M.mechanism_inputs
    monkeypatch.setattr(M, "mechanism_inputs", lambda *a, **k: built.append(1) or real(*a, **k))
    M.reset()
    answers = M.texts_for(generate_stories(16, seed=0), 8, "answers")
    cfg = MechanismConfig(n_sequences=2)
    for heads in ([(1, 2)], [(1, 3)], []):
        M.mechanism_check(model, tok, cfg, answers, heads, model_key="k", tokens="answers")
    assert built == [1]
    # the same key with another tokenizer or another model: built (and measured) afresh
    import copy

    other_tok, other_model = copy.deepcopy(tok), copy.deepcopy(model)
    M.mechanism_check(model, other_tok, cfg, answers, [], model_key="k", tokens="answers")
    assert built == [1, 1]
    out = M.mechanism_check(other_model, tok, cfg, answers, [], model_key="k",
                            tokens="answers")
    assert built == [1, 1, 1]
    out["icl_early"] = -1.0  # a job's record is its own: the cached positions stay
    again = M.mechanism_check(other_model, tok, cfg, answers, [], model_key="k",
                              tokens="answers")
    assert again["icl_early"] > 0 and built == [1, 1, 1]


@pytest.mark.parametrize("tokens", ["text", "answers"])
def test_the_losses_read_are_the_plain_forwards(tiny, tiny_prefix, tokens):
    """losses_at (the read tokens only, through the evaluator's shortcuts and store) against
    token_losses of the whole plain forward: equal where read (float32 rounding of a
    reordered sum), NaN elsewhere; so the recorded numbers are the full passes' to ~1e-6,
    and the same with the store and without, bit for bit."""
    from ih_sweep.ablation.hooks import ablate_heads
    from ih_sweep.config.schema import EvalConfig
    from ih_sweep.evaluation.fastpath import reuse

    model, tok = tiny
    reuse.reset()
    texts = M.texts_for(generate_stories(24, seed=4), 12, tokens)
    inputs = M.mechanism_inputs(tok, MechanismConfig(n_sequences=6), texts, tokens, None)
    heads = select_heads(tiny_prefix, "high", 8)
    for ids, read in ((inputs.repeat_ids, inputs.repeat_tokens()),
                      (inputs.text_ids, inputs.text_tokens())):
        with torch.no_grad():
            full = M.token_losses(model(input_ids=ids).logits, ids)
        got = M.losses_at(model, ids, read, 5, EvalConfig())
        mask = torch.zeros_like(ids, dtype=torch.bool).scatter_(1, read, True)
        assert torch.isnan(got[~mask]).all() and not torch.isnan(got[mask]).any()
        assert torch.allclose(got[mask], full[mask], atol=1e-5, rtol=1e-5)
        with ablate_heads(model, heads):
            stored = M.losses_at(model, ids, read, 5, EvalConfig())
            computed = M.losses_at(model, ids, read, 5, EvalConfig(layer_store_mb=0))
            with torch.no_grad():
                full = M.token_losses(model(input_ids=ids).logits, ids)
        assert torch.equal(stored[mask], computed[mask])
        assert torch.allclose(stored[mask], full[mask], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="token 0"):
        M.losses_at(model, ids, torch.zeros((ids.shape[0], 1), dtype=torch.long), 5)
    reuse.reset()


def test_answer_positions_are_each_examples_answer(tiny):
    """icl_tokens=answers: the token after each ``Answer: `` of the training text is the
    answer word (the tokens the tiny model's loss was on); first and last example."""
    _, tok = tiny
    stories = generate_stories(8, seed=3)
    texts = M.texts_for(stories, 8, "answers")
    assert texts[0] == next(iter_lm_text(stories[:1]))  # the tiny model's training text
    for story, text in zip(stories, texts):
        ids, pos = M.answer_positions(tok, text)
        answers = [story["answer"][i] for i in question_indices(story)]
        assert [tok.decode([ids[p]]).strip() for p in pos] == answers
    ids, first, last = M.answer_inputs(tok, texts)
    assert ids.shape[0] == 8 and all(f < la < ids.shape[1] for f, la in zip(first, last))
    with pytest.raises(ValueError, match="needs an early and a late"):
        M.answer_inputs(tok, ["Passage: x\n\nQuestion: Where is Mary?\nAnswer: kitchen\n"])


def test_answer_icl_score_is_last_minus_first_answer():
    losses = torch.tensor([[float("nan"), 1.0, 4.0, 0.5, 9.0],
                           [float("nan"), 2.0, 6.0, 3.0, 9.0]])
    assert M.answer_icl_score(losses, [2, 1], [3, 2]) == pytest.approx(((0.5 - 4) + (6 - 2)) / 2)


def test_icl_tokens_auto_is_answers_for_the_bundled_model_only():
    assert M.icl_tokens(MechanismConfig(), "builtin:tiny") == "answers"
    assert M.icl_tokens(MechanismConfig(), "EleutherAI/pythia-160m") == "text"
    assert M.icl_tokens(MechanismConfig(icl_tokens="text"), "builtin:tiny") == "text"
    assert M.icl_tokens(MechanismConfig(icl_tokens="answers"), "/models/x") == "answers"


def test_icl_score_on_answers_of_the_tiny_model(tiny, tiny_prefix):
    """The tiny model answers the first in-context example as well as the last unablated
    (score near 0: its answers need the story, not earlier examples); ablating the top-16
    heads moves the score far beyond what the layer-matched control does."""
    model, tok = tiny
    texts = M.texts_for(generate_stories(32, seed=0), 32, "answers")
    cfg = MechanismConfig(n_sequences=2)
    high = M.mechanism_check(model, tok, cfg, texts, select_heads(tiny_prefix, "high", 16),
                             tokens="answers")
    low = M.mechanism_check(model, tok, cfg, texts, select_heads(tiny_prefix, "low", 16),
                            tokens="answers")
    assert abs(high["icl_score_unablated"]) < 0.05
    assert high["icl_tokens"] == "answers" and high["icl_texts"] == 32
    assert high["icl_early"] < high["icl_late"]
    assert abs(high["icl_score"] - high["icl_score_unablated"]) > \
        5 * abs(low["icl_score"] - low["icl_score_unablated"])


def test_mechanism_settings_are_semantic_unless_it_is_off():
    base = config_hash(compose())
    assert config_hash(compose("mechanism.seed=3")) != base
    assert config_hash(compose("mechanism.batch_size=2")) == base  # speed only
    off = config_hash(compose("mechanism.enabled=false"))
    assert off != base and config_hash(compose("mechanism.enabled=false",
                                               "mechanism.seed=3")) == off
    with pytest.raises(ConfigError, match="mechanism.repeats"):
        settings(compose("mechanism.repeats=1"))
    with pytest.raises(ConfigError, match="mechanism.icl_window"):
        settings(compose("mechanism.icl_window=0"))


def test_a_cli_job_records_the_mechanism(tmp_path):
    """A real evaluate job (debug=fast) writes the four numbers and their settings into
    job.json; condition=none has ablated = unablated."""
    out = tmp_path / "high"
    run_job(out, "debug=fast", "n_heads=16", "condition=high")
    mech = json.loads((out / "job.json").read_text())["mechanism"]
    for key in ("repeat_loss", "repeat_loss_unablated", "icl_score", "icl_score_unablated"):
        assert isinstance(mech[key], float), key
    assert mech["repeat_loss"] > mech["repeat_loss_unablated"] + 3
    assert mech["seed"] == 1000 and mech["icl_texts"] == 20
    assert mech["icl_tokens"] == "answers"  # auto, on the bundled model
    none = run_job(tmp_path / "none", "debug=fast", "condition=none").mechanism
    assert none["repeat_loss"] == none["repeat_loss_unablated"] == mech["repeat_loss_unablated"]
    off = run_job(tmp_path / "off", "debug=fast", "condition=none", "mechanism.enabled=false")
    assert off.mechanism == {}

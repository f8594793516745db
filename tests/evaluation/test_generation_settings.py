"""The model's own generation settings: where its generation config changes what greedy
``generate`` returns, the evaluator's outcomes are ``generate``'s with that config, one item
at a time (the notebook's method), with one log line; settings that only act when sampling
leave the fast evaluator on."""

from __future__ import annotations

import copy
import inspect
import re

import pytest
import torch
import transformers as tf
from transformers import GenerationConfig, WatermarkingConfig

from ih_sweep import data
from ih_sweep.config.schema import EvalConfig
from ih_sweep.evaluation import by_generate
from ih_sweep.evaluation import generation_settings as gs
from ih_sweep.evaluation.decoding import cut_at_eos, deciding_length, decode
from ih_sweep.evaluation.evaluator import evaluate, is_correct
from ih_sweep.evaluation.rows import encode
from ih_sweep.model.tiny import NEWLINE
from ih_sweep.model.tokens import pad_id

SETTINGS = EvalConfig(progress=False, batch_size=8, cpu_workers=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def fresh_log_memory():
    """Each test sees the once-per-model log line afresh."""
    by_generate.reset()


def _items(n_stories: int = 10, seed: int = 11):
    return data.make_items(data.generate_stories(n_stories, seed=seed), "all")[:30]


@torch.no_grad()
def _generate_each(model, tok, items) -> list[str]:
    """The notebook's method: ``model.generate`` on one prompt at a time, greedy, the
    model's generation config otherwise as it is (the tokenizer passed for stop strings)."""
    out = []
    for it in items:
        ids = torch.tensor([encode(tok, it.prompt)])
        gen = model.generate(ids, max_new_tokens=3, do_sample=False, num_beams=1,
                             pad_token_id=pad_id(tok), temperature=None, top_p=None,
                             top_k=None, tokenizer=tok)
        out.append(decode(tok, cut_at_eos(gen[0, ids.shape[1]:].tolist(),
                                            tok.eos_token_id)))
    return out


def _with(model, monkeypatch, **fields) -> GenerationConfig:
    config = copy.deepcopy(model.generation_config)
    for name, value in fields.items():
        setattr(config, name, value)
    monkeypatch.setattr(model, "generation_config", config)
    return config


def _check_routed(model, tok, items, name, caplog) -> None:
    """Routed: every outcome and continuation is generate's, and the setting changed at
    least one continuation (else the case would prove nothing)."""
    caplog.set_level("WARNING", logger="ih_sweep.evaluation.by_generate")
    got = evaluate(model, tok, items, SETTINGS)
    ref = _generate_each(model, tok, items)
    assert [r.continuation for r in got] == ref
    assert [r.correct for r in got] == [is_correct(c, it.answer, "contains")
                                        for c, it in zip(ref, items)]
    assert {r.decided_by for r in got} == {"generate"}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and f"{name}=" in lines[0] and "model.generate" in lines[0]
    with_plain = copy.deepcopy(model.generation_config)
    for field, _ in gs.GREEDY_CHANGING:
        setattr(with_plain, field, GenerationConfig().__dict__.get(field))
    with_plain.eos_token_id = tok.eos_token_id
    model.generation_config = with_plain
    plain = evaluate(model, tok, items, SETTINGS)
    assert {r.decided_by for r in plain} <= {"forward", "decode"}
    assert any(p.continuation != c for p, c in zip(plain, ref)), f"{name} changed nothing"


# --------------------------------------------------------------------------- the shipped model
def _common_first_token(tok, items) -> int:
    firsts = [tok(it.answer, add_special_tokens=False)["input_ids"][0] for it in items]
    return max(set(firsts), key=firsts.count)


def _cases(tok, items) -> dict:
    common = _common_first_token(tok, items)
    newline = tok.convert_tokens_to_ids(NEWLINE)
    return {
        "repetition_penalty": 1.3,
        "encoder_repetition_penalty": 0.5,
        "no_repeat_ngram_size": 2,
        "encoder_no_repeat_ngram_size": 2,
        "bad_words_ids": [[common]],
        "sequence_bias": {(common,): -10.0},
        "suppress_tokens": [common],
        "begin_suppress_tokens": [common],
        "guidance_scale": 3.0,
        "watermarking_config": WatermarkingConfig(bias=5.0),
        "token_healing": True,
        "eos_token_id": [tok.eos_token_id, newline],  # generate stops at a newline too
    }


CASES = ["repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
         "encoder_no_repeat_ngram_size", "bad_words_ids", "sequence_bias", "suppress_tokens",
         "begin_suppress_tokens", "guidance_scale", "watermarking_config", "token_healing",
         "eos_token_id"]


@pytest.mark.parametrize("name", CASES)
def test_a_greedy_changing_setting_gives_generates_outcomes(name, tiny, monkeypatch, caplog):
    model, tok = tiny
    items = _items()
    _with(model, monkeypatch, **{name: _cases(tok, items)[name]})
    _check_routed(model, tok, items, name, caplog)


# The shipped model never ends an answer with [EOS] within 3 tokens, so the settings that act
# on the end-of-sequence token are checked with the newline as EOS (tokenizer and config).
EOS_CASES = {"min_new_tokens": 3, "min_length": 10_000, "forced_eos_token_id": None,
             "exponential_decay_length_penalty": (0, 5.0)}


@pytest.mark.filterwarnings("ignore:Unfeasible length constraints")
@pytest.mark.parametrize("name", sorted(EOS_CASES))
def test_end_of_sequence_settings_give_generates_outcomes(name, tiny, monkeypatch, caplog):
    model, tok = tiny
    tok = copy.deepcopy(tok)
    tok.eos_token = NEWLINE
    newline = tok.eos_token_id
    items = _items()
    value = newline if name == "forced_eos_token_id" else EOS_CASES[name]
    _with(model, monkeypatch, eos_token_id=newline, **{name: value})
    _check_routed(model, tok, items, name, caplog)


# --------------------------------------------------------------------------- stop strings
def _bpe_model():
    """A byte-level BPE tokenizer trained on bAbI text (transformers' stop-string matcher
    needs one that spells arbitrary strings; the shipped word-level one cannot) and a
    random-weight 2-layer Llama over its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = [it.prompt + it.answer for it in _items(20, seed=3)]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                     bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    model.generation_config = GenerationConfig.from_model_config(model.config)
    return model, tok


def test_stop_strings_give_generates_outcomes(monkeypatch, caplog):
    """The stop string: the second character of an item's plain greedy continuation (the
    random model's tokens are arbitrary bytes), so that generation stops early there."""
    model, tok = _bpe_model()
    items = _items()
    plain = _generate_each(model, tok, items)
    _with(model, monkeypatch, stop_strings=[next(c[1] for c in plain if len(c) > 2)])
    _check_routed(model, tok, items, "stop_strings", caplog)


# --------------------------------------------------------------------------- not routed
def test_sampling_settings_leave_the_fast_evaluator_on(tiny, monkeypatch, caplog):
    """temperature / top_k / top_p act only when sampling: not routed, no line, the same
    outcomes as without them."""
    model, tok = tiny
    items = _items()
    before = evaluate(model, tok, items, SETTINGS)
    _with(model, monkeypatch, temperature=0.6, top_k=5, top_p=0.9, min_p=0.1, typical_p=0.8)
    caplog.set_level("INFO", logger="ih_sweep.evaluation.by_generate")
    got = evaluate(model, tok, items, SETTINGS)
    assert {r.decided_by for r in got} <= {"forward", "decode"}
    assert [(r.continuation, r.correct) for r in got] == \
        [(r.continuation, r.correct) for r in before]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_sampling_or_beams_in_the_config_are_overridden_with_one_line(tiny, monkeypatch,
                                                                      caplog):
    model, tok = tiny
    items = _items()
    before = evaluate(model, tok, items, SETTINGS)
    _with(model, monkeypatch, do_sample=True, temperature=0.6, num_beams=4)
    caplog.set_level("WARNING", logger="ih_sweep.evaluation.by_generate")
    for _ in range(2):  # one line per model, not per evaluation
        got = evaluate(model, tok, items, SETTINGS)
    assert [(r.continuation, r.correct, r.decided_by) for r in got] == \
        [(r.continuation, r.correct, r.decided_by) for r in before]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "do_sample=True" in lines[0] and "num_beams=4" in lines[0]
    assert "greedily by design" in lines[0]


def test_the_line_comes_once_per_model(tiny, monkeypatch, caplog):
    model, tok = tiny
    items = _items()[:4]
    _with(model, monkeypatch, repetition_penalty=1.3)
    caplog.set_level("WARNING", logger="ih_sweep.evaluation.by_generate")
    for _ in range(3):
        evaluate(model, tok, items, SETTINGS)
    assert len(caplog.records) == 1


def test_generation_config_file_is_read(tiny, tmp_path, caplog):
    """The issue's case end to end: a model folder whose generation_config.json sets
    repetition_penalty 1.3, loaded through load_model, evaluated by generate."""
    from ih_sweep.config.schema import DType, ModelConfig, QuantizationConfig
    from ih_sweep.model.loading import load_model

    model, tok = tiny
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    config = copy.deepcopy(model.generation_config)
    config.repetition_penalty = 1.3
    config.save_pretrained(folder)
    loaded, ltok = load_model(ModelConfig(name="rp", path=str(folder), dtype=DType.float32),
                               QuantizationConfig(), "cpu")
    assert loaded.generation_config.repetition_penalty == 1.3
    items = _items()
    got = evaluate(loaded, ltok, items, SETTINGS)
    assert [r.continuation for r in got] == _generate_each(loaded, ltok, items)


def test_a_routed_format_with_stop_strings_gives_generates_outcomes(tiny, monkeypatch):
    """HELM's prompt, 5 tokens, cut at a newline, quasi-exact: routed outcomes and the cut
    continuations are those of generate (with the model's repetition penalty) stopped and
    cut the same way."""
    from ih_sweep.config.schema import DataConfig
    from ih_sweep.testing import generate_one_at_a_time

    model, tok = tiny
    helm = EvalConfig(format="helm", metric="quasi_exact", scope="all", max_new_tokens=5,
                      n_shots=2, stop=["\n"], progress=False, batch_size=8, cpu_workers=1)
    items = data.items_for(DataConfig(n_stories=4, seed=77), helm)[:20]
    _with(model, monkeypatch, repetition_penalty=1.3)
    got = evaluate(model, tok, items, helm)
    ref = [generate_one_at_a_time(model, tok, it, 5, helm.stop) for it in items]
    assert [r.continuation for r in got] == ref
    assert [r.correct for r in got] == [is_correct(c, it.target, "quasi_exact", helm.stop)
                                        for c, it in zip(ref, items)]
    assert {r.decided_by for r in got} == {"generate"}


def test_margins_are_generates_processed_scores(tiny, monkeypatch):
    """margin: the smallest top-1 minus top-2 gap of generate's scores (after its
    processors) over the steps up to the deciding one."""
    model, tok = tiny
    items = _items()[:8]
    _with(model, monkeypatch, repetition_penalty=1.3)
    got = evaluate(model, tok, items, SETTINGS)
    for r in got:
        ids = torch.tensor([encode(tok, r.item.prompt)])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=3, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=pad_id(tok))
        top2 = torch.stack(gen.scores, 1)[0].topk(2, -1).values
        gaps = (top2[:, 0] - top2[:, 1]).tolist()
        toks = gen.sequences[0, ids.shape[1]:].tolist()
        decided = deciding_length(tok, toks, r.item.answer, SETTINGS,
                                              tok.eos_token_id)
        assert r.margin == pytest.approx(min(gaps[:decided]), rel=1e-6)


# --------------------------------------------------------------------------- detection (pure)
def test_each_listed_setting_is_detected_and_defaults_are_not():
    default = GenerationConfig(eos_token_id=2)
    assert gs.greedy_changing(default, 2) == {} and gs.not_greedy(default) == {}
    assert gs.greedy_changing(None, 2) == {}
    values = {"repetition_penalty": 1.3, "encoder_repetition_penalty": 1.2,
              "no_repeat_ngram_size": 3, "encoder_no_repeat_ngram_size": 3,
              "bad_words_ids": [[5]], "sequence_bias": {(5,): 1.0}, "suppress_tokens": [5],
              "begin_suppress_tokens": [5], "min_length": 4, "min_new_tokens": 1,
              "forced_eos_token_id": 2, "exponential_decay_length_penalty": (1, 1.5),
              "guidance_scale": 1.5, "watermarking_config": WatermarkingConfig(),
              "stop_strings": ["x"], "token_healing": True}
    assert set(values) == {name for name, _ in gs.GREEDY_CHANGING}
    for name, value in values.items():
        config = GenerationConfig(eos_token_id=2)
        setattr(config, name, value)
        assert list(gs.greedy_changing(config, 2)) == [name]
    assert list(gs.greedy_changing(GenerationConfig(eos_token_id=[2, 7]), 2)) == \
        ["eos_token_id"]
    neutral = GenerationConfig(eos_token_id=[2], repetition_penalty=1.0,
                               no_repeat_ngram_size=0, suppress_tokens=[], min_length=0)
    assert gs.greedy_changing(neutral, 2) == {}


def test_sampling_only_settings_are_not_greedy_changing():
    config = GenerationConfig(eos_token_id=2, temperature=0.7, top_k=5, top_p=0.9)
    assert gs.greedy_changing(config, 2) == {} and gs.not_greedy(config) == {}
    config.do_sample = True
    assert gs.not_greedy(config) == {"do_sample": True, "temperature": 0.7, "top_k": 5,
                                     "top_p": 0.9}
    assert gs.greedy_changing(config, 2) == {}


def test_every_field_the_library_reads_is_classified():
    """Each generation-config field that transformers' logits processors and stopping
    criteria read is either listed as changing greedy output, as a decoding mode, or left
    alone with a reason: a release adding a processor fails here until it is classified."""
    from transformers.generation.utils import GenerationMixin

    read = set()
    for method in ("_get_logits_processor", "_get_stopping_criteria"):
        source = inspect.getsource(getattr(GenerationMixin, method))
        read |= set(re.findall(r"generation_config\.(\w+)", source))
    known = {name for name, _ in gs.GREEDY_CHANGING} | {name for name, _ in gs.NOT_GREEDY} \
        | set(gs.LEFT_ALONE)
    assert read and read <= known, sorted(read - known)


def test_the_greedy_copy_keeps_the_processors_and_decodes_greedily():
    config = GenerationConfig(do_sample=True, num_beams=4, temperature=0.5,
                              repetition_penalty=1.3, eos_token_id=2)
    greedy = gs.greedy_config(config, 3, 0)
    assert greedy.get_generation_mode() == "greedy_search"
    assert greedy.repetition_penalty == 1.3 and greedy.max_new_tokens == 3
    assert greedy.output_scores and greedy.return_dict_in_generate
    assert config.do_sample and config.num_beams == 4  # the model's own is left as it was

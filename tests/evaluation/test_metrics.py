"""The metrics (ih_sweep.evaluation.metrics):
per script, per metric, stop strings and early decisions."""

from __future__ import annotations

import random
import re
import sys
import unicodedata

import pytest
from compose_config import compose
from conftest import BABI

from ih_sweep import data
from ih_sweep.config.errors import ConfigError
from ih_sweep.config.hydra import settings
from ih_sweep.config.rules import check
from ih_sweep.config.schema import EvalConfig, Metric
from ih_sweep.evaluation.metrics import (
    HELM_METRICS,
    cut_at_stop,
    decide_partial,
    exact_match,
    final_or_verdict,
    helm_scores,
    is_correct,
    is_word_char,
    normalize_text,
    prefix_exact_match,
    quasi_exact_match,
    quasi_prefix_exact_match,
    words,
)
from ih_sweep.pipeline.records import HELM_COLUMNS

ALL = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]


# --------------------------------------------------------------------------- word characters
def test_word_characters_extend_pythons_w():
    """Every character Python's ``\\w`` (the seed's rule) matches is still a word character,
    so no English score changes; what is added are marks, connector punctuation, ZWNJ/ZWJ."""
    w = re.compile(r"\w")
    assert all(is_word_char(ch) for ch in ALL if w.fullmatch(ch))
    added = {unicodedata.category(ch) for ch in ALL if is_word_char(ch) and not w.fullmatch(ch)}
    assert added <= {"Mn", "Mc", "Me", "Pc", "Cf"}
    assert is_word_char("\u200d") and not is_word_char("\u200b")  # ZWJ yes, ZWSP no


def test_nfc_never_composes_a_non_word_character_into_a_word_character():
    """What :func:`decide_partial` relies on: a word followed by a non-word character cannot
    grow, even when a later combining mark composes with that character under NFC."""
    for ch in ALL:
        parts = unicodedata.decomposition(ch).split()
        if len(parts) != 2 or parts[0].startswith("<"):
            continue
        first, second = (chr(int(p, 16)) for p in parts)
        if unicodedata.normalize("NFC", first + second) == ch and not is_word_char(first):
            assert not is_word_char(ch), (hex(ord(ch)), hex(ord(first)))


# --------------------------------------------------------------------------- Latin
def test_contains_is_the_seeds_on_english():
    assert is_correct(" hallway\nPassage", "hallway", "contains")
    assert is_correct("the hallway.", "hallway", "contains")
    assert not is_correct("hallways", "hallway", "contains")
    assert is_correct("apple and football", "apple,football", "contains")
    assert not is_correct("apple", "apple,football", "contains")
    assert not is_correct("anything", "?", "contains")  # an answer without a word


def test_exact_is_the_first_words():
    assert is_correct("hallway Read", "hallway", "exact")
    assert not is_correct("the hallway", "hallway", "exact")
    assert is_correct("apple, football.", "apple,football", "exact")
    with pytest.raises(ValueError, match="allowed values: contains, exact, quasi_exact, "
                                         "verbatim, helm_exact, prefix_exact, "
                                         "quasi_prefix_exact"):
        is_correct("x", "x", "fuzzy")


@pytest.mark.parametrize("metric", ["contains", "exact"])
def test_decomposed_and_precomposed_accents_are_the_same_word(metric):
    precomposed, decomposed = "caf\u00e9", "cafe\u0301"
    assert re.findall(r"\w+", decomposed) == ["cafe"]  # the seed's rule cut the accent off
    assert words(decomposed) == [precomposed]
    assert is_correct(f" {decomposed}\n", precomposed, metric)
    assert is_correct(f" {precomposed}.", decomposed, metric)
    assert not is_correct(" cafe", precomposed, metric)


def test_answers_of_every_english_file_are_the_seeds_comma_parts():
    """For bAbI's answers the answer's words are exactly the seed's comma-separated parts."""
    if not (BABI / "en").is_dir():
        pytest.skip(f"{BABI} is absent")
    for task in data.TASK_NAMES:
        for story in data.load_babi_file(data.babi_file(BABI, "en", task, "test")):
            for answer in {a for a, t in zip(story["answer"], story["type"]) if t == 1}:
                assert words(answer) == [p.strip() for p in answer.split(",")], answer


# --------------------------------------------------------------------------- Devanagari
HINDI = {"रसोई": "kitchen", "बगीचा": "garden", "गलियारा": "hallway", "शयनकक्ष": "bedroom",
         "दफ़्तर": "office", "स्नानघर": "bathroom"}


@pytest.mark.parametrize("answer", sorted(HINDI))
def test_hindi_answers_score(answer):
    assert re.findall(r"\w+", answer) != [answer]  # the seed's rule broke every one of these
    assert words(answer) == [unicodedata.normalize("NFC", answer)]
    for metric in ("contains", "exact"):
        assert is_correct(f" {answer}\n", answer, metric)
        assert is_correct(f"{answer} में।", answer, metric)  # danda: punctuation
        assert not is_correct(f"{answer}ों", answer, metric)  # another word
    assert is_correct(f"वह {answer} में है", answer, "contains")
    assert not is_correct(f"वह {answer} में है", answer, "exact")


def test_hindi_nukta_precomposed_or_not_is_one_word():
    """U+095E (फ़, a composition exclusion) and फ + nukta are the same letter under NFC."""
    assert is_correct(" \u0926\u095e\u094d\u0924\u0930", "दफ\u093c्तर", "exact")
    assert is_correct(" दफ\u093c्तर", "\u0926\u095e\u094d\u0924\u0930", "contains")


def test_hindi_partial_decisions():
    assert decide_partial("रसो", "रसोई", "exact") is None  # a vowel sign may follow
    assert decide_partial("रसोई", "रसोई", "contains") is None
    assert decide_partial("रसोई ", "रसोई", "contains") is True
    assert decide_partial("बगीचा ", "रसोई", "exact") is False


@pytest.mark.parametrize("lang", ["hn", "hn-10k", "shuffled", "shuffled-10k"])
def test_answers_of_real_files_score_in_their_own_language(lang):
    """Every answer of the release's hn/shuffled test files (absent here: skipped) is its own
    words and scores as right in each word metric."""
    if not (BABI / lang).is_dir():
        pytest.skip(f"{BABI / lang} is absent")
    for task in data.TASK_NAMES:
        for story in data.load_babi_file(data.babi_file(BABI, lang, task, "test")):
            for answer in {a for a, t in zip(story["answer"], story["type"]) if t == 1}:
                parts = [unicodedata.normalize("NFC", p.strip()) for p in answer.split(",")]
                assert words(answer) == parts, answer
                for metric in ("contains", "exact"):
                    assert is_correct(f" {answer}\n", answer, metric), answer


# --------------------------------------------------------------------------- shuffled
def test_shuffled_vocabulary_answers_score():
    """bAbI's shuffled tasks write every word as a scrambled letter string."""
    assert is_correct(" fahhdsw.\nXifsf", "fahhdsw", "contains")
    assert is_correct("fahhdsw Xifsf", "fahhdsw", "exact")
    assert not is_correct("fahhdswq", "fahhdsw", "contains")
    assert is_correct("bqqmf, nimm", "bqqmf,nimm", "exact")


# --------------------------------------------------------------------------- HELM
@pytest.mark.parametrize("text,normalized", [
    ("The Kitchen.", "kitchen"),  # lower-case, punctuation deleted, article dropped
    ("an apple", "apple"),
    ("a, b", "b"),  # "a" is an article once the comma is gone
    ("apple,milk", "applemilk"),  # punctuation deleted, not replaced by a space
    ("  south \t west\n", "south west"),  # whitespace collapsed
    ("theater", "theater"),  # articles only as whole words
    ("it's", "its"),
])
def test_helm_normalize_text(text, normalized):
    assert normalize_text(text) == normalized


def test_helm_quasi_exact_match():
    assert quasi_exact_match("kitchen", " Kitchen.")
    assert quasi_exact_match("kitchen", "the kitchen")
    assert quasi_exact_match("apple,milk", "apple,milk")
    assert not quasi_exact_match("apple,milk", "apple, milk")  # HELM's known quirk
    assert not quasi_exact_match("kitchen", "kitchen garden")
    assert not quasi_exact_match("kitchen", " \n")  # empty after strip: 0
    assert is_correct(" kitchen\nPassage: x", " kitchen", "quasi_exact", ["\n"])
    assert not is_correct(" kitchen Passage", " kitchen", "quasi_exact", ["\n"])


# HELM's four metrics (evaluate_reference_metrics.py, helm 63754d05) on hand cases: gold, the
# completion as the model wrote it (HELM strips it before scoring), and the four verdicts in
# HELM_METRICS' order (exact_match, quasi_exact_match, prefix_exact_match,
# quasi_prefix_exact_match), worked out from HELM's definitions by hand
HELM_CASES = [
    ("kitchen", " kitchen", (1, 1, 1, 1)),
    ("kitchen", "kitchen\t ", (1, 1, 1, 1)),
    ("kitchen", " Kitchen", (0, 1, 0, 1)),  # case: only the quasi ones fold it
    ("kitchen", " kitchen.", (0, 1, 1, 1)),  # punctuation: dropped by normalize_text
    ("kitchen", " the kitchen", (0, 1, 0, 1)),  # an article: a space after normalize_text
    ("kitchen", " kitchen garden", (0, 0, 1, 1)),  # more words: the prefixes still hold
    ("kitchen", " kitchens", (0, 0, 1, 1)),  # a character prefix, not a word prefix
    ("kitchen", " Kitchen garden", (0, 0, 0, 1)),
    ("kitchen", " garden kitchen", (0, 0, 0, 0)),
    ("kitchen", " ", (0, 0, 0, 0)),  # empty after stripping: 0 in each
    ("kitchen", "", (0, 0, 0, 0)),
    ("apple,milk", " apple,milk", (1, 1, 1, 1)),
    ("apple,milk", " apple, milk", (0, 0, 0, 0)),  # the comma goes, the space stays
    ("apple,milk", " apple milk", (0, 0, 0, 0)),
    ("apple,milk", " applemilk", (0, 1, 0, 1)),  # normalize_text deletes the comma
    ("south west", " south west", (1, 1, 1, 1)),  # task 19 in HELM's words
    ("south west", " south", (0, 0, 0, 0)),
    ("two", " Two.", (0, 1, 0, 1)),
    ("none", " nothing", (0, 0, 0, 0)),
    ("no", " nothing", (0, 0, 1, 1)),  # the prefixes' blind spot
]


def test_helm_metric_names_are_the_result_columns():
    assert list(HELM_METRICS) == HELM_COLUMNS
    assert set(HELM_METRICS.values()) <= {str(m) for m in Metric}


@pytest.mark.parametrize("gold, pred, want", HELM_CASES)
def test_helms_four_metrics_on_hand_cases(gold, pred, want):
    fns = (exact_match, quasi_exact_match, prefix_exact_match, quasi_prefix_exact_match)
    assert tuple(int(f(gold, pred)) for f in fns) == want
    # as the evaluator scores: the target with its leading space, the continuation cut at
    # HELM's stop string, each metric deciding `correct` in turn
    scores = helm_scores(pred + "\nPassage: kitchen", " " + gold, ["\n"])
    assert tuple(int(v) for v in scores.values()) == want
    for name, metric in HELM_METRICS.items():
        assert is_correct(pred + "\nx", " " + gold, metric, ["\n"]) == scores[name]


def test_helms_metrics_wait_for_the_end():
    """No early decision for HELM's metrics: the stripped end decides each of them."""
    stop = ["\n"]
    for metric in HELM_METRICS.values():
        assert decide_partial(" kitchen", "kitchen", metric, stop) is None
        assert decide_partial(" garden", "kitchen", metric, stop) is None
        assert decide_partial(" kitchen\n", "kitchen", metric, stop) is True
    # `whole`: no metric decides before the continuation has ended
    ev = EvalConfig(metric="contains", max_new_tokens=5, stop=stop)
    assert final_or_verdict("kitchen ", [1, 2], "kitchen", ev, None) is True
    assert final_or_verdict("kitchen ", [1, 2], "kitchen", ev, None, whole=True) is None
    assert final_or_verdict("kitchen \n", [1, 2], "kitchen", ev, None, whole=True) is True
    assert final_or_verdict("x y", [1] * 5, "kitchen", ev, None, whole=True) is False


def test_helms_metrics_on_every_english_file():
    """On every answer of the release's en test files (HELM's task-19 paths in words): the
    reference output HELM's adapter puts after ``Answer:`` (`` <answer>``) scores 1 in each
    of HELM's metrics; written in capitals with a full stop, only the quasi ones forgive it;
    with a word added, only the prefix ones. The word-level ``exact`` disagrees with HELM's
    ``exact_match`` where the answer holds a comma (a list: words ignore the comma)."""
    if not (BABI / "en").is_dir():
        pytest.skip(f"{BABI} is absent")
    answers = set()
    for task in data.TASK_NAMES:
        for story in data.load_babi_file(data.babi_file(BABI, "en", task, "test")):
            answers |= {data.helm_answer(a.strip(), task)
                        for a, t in zip(story["answer"], story["type"]) if t == 1}
    assert len(answers) == 56 and sum("," in a for a in answers) > 5
    for a in sorted(answers):
        assert set(helm_scores(f" {a}", a).values()) == {True}, a
        loud = helm_scores(f" {a.upper()}.", a)
        assert loud == {"exact_match": False, "quasi_exact_match": True,
                        "prefix_exact_match": False, "quasi_prefix_exact_match": True}, a
        more = helm_scores(f" {a} xylophone", a)
        assert more == {"exact_match": False, "quasi_exact_match": False,
                        "prefix_exact_match": True, "quasi_prefix_exact_match": True}, a
        spaced = f" {a.replace(',', ', ')}"
        assert is_correct(spaced, a, "exact") and \
            helm_scores(spaced, a)["exact_match"] == ("," not in a), a


# --------------------------------------------------------------------------- lm-eval
def test_verbatim_is_lm_evals_exact_match():
    stop = ["\n", "Passage:"]
    assert is_correct(" kitchen", " kitchen", "verbatim", stop)
    assert is_correct(" kitchen\nPassage: x", " kitchen", "verbatim", stop)
    assert is_correct(" kitchenPassage: x", " kitchen", "verbatim", stop)
    assert not is_correct("kitchen", " kitchen", "verbatim", stop)  # the leading space counts
    assert not is_correct(" Kitchen", " kitchen", "verbatim", stop)
    assert not is_correct(" kitchen.", " kitchen", "verbatim", stop)
    assert not is_correct(" kitchen ", " kitchen", "verbatim", stop)


# --------------------------------------------------------------------------- stop strings
def test_cut_at_stop():
    assert cut_at_stop("a\nb", ["\n"]) == "a"
    assert cut_at_stop("aPassage:b\nc", ["\n", "Passage:"]) == "a"
    assert cut_at_stop("abc", ["\n"]) == "abc"
    assert cut_at_stop("a\nb", []) == "a\nb"


def test_cut_equals_the_originals_one_string_after_the_other():
    """HELM and lm-eval cut at each stop string in list order (``text.split(s)[0]``): the
    same cut as at the earliest of any, for stop strings that cannot overlap."""
    rng = random.Random(0)
    pieces = ["a", "\n", "Pass", "age:", "P", ":", " "]
    for stop in (["\n", "Passage:"], ["Passage:", "\n"]):
        for _ in range(2000):
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
            sequential = text
            for s in stop:
                sequential = sequential.split(s)[0]
            assert cut_at_stop(text, stop) == sequential


def test_overlapping_or_empty_stop_strings_are_refused():
    config = settings(compose("eval=lm_eval"))
    assert config.eval.stop == ["\n", "Passage:"]
    for stop, message in [(["\n", "\n\n"], r"'\\n' is part of '\\n\\n'"),
                          (["ab", "bc"], r"the end of 'ab' can begin 'bc'"),
                          (["\n", ""], r"allowed: a list of non-empty strings")]:
        config.eval.stop = stop
        with pytest.raises(ConfigError, match=f"eval.stop=.* is not allowed; {message}"):
            check(config)


def test_partial_decisions_only_when_final():
    assert decide_partial("hallway ", "hallway", "contains") is True
    assert decide_partial("hallway", "hallway", "contains") is None  # could become hallways
    assert decide_partial("kitchen ", "hallway", "contains") is None  # answer may follow
    assert decide_partial("kitchen ", "hallway", "exact") is False
    assert decide_partial("hall", "hallway", "exact") is None
    assert decide_partial("hallway.", "hallway", "exact") is True
    # a byte-fallback decoder's incomplete character may still extend the word
    assert decide_partial("caf\ufffd", "caf", "exact") is None
    assert decide_partial("hallway\ufffd", "hallway", "contains") is None


def test_partial_decisions_with_stop_strings():
    stop = ["\n", "Passage:"]
    assert decide_partial("kitchen", " kitchen", "verbatim", stop) is False  # no space
    assert decide_partial(" kit", " kitchen", "verbatim", stop) is None
    assert decide_partial(" kitchen", " kitchen", "verbatim", stop) is None  # may go on
    assert decide_partial(" kitchen\n", " kitchen", "verbatim", stop) is True
    assert decide_partial(" kitchen\nhall", " kitchen", "verbatim", stop) is True
    assert decide_partial(" kitchen garden\n", "kitchen", "quasi_exact", stop) is False
    assert decide_partial(" kitchen garden", "kitchen", "quasi_exact", stop) is None
    # "Pass" may grow into the stop string: the text before it is what is known
    assert decide_partial(" kitchenPass", " kitchen", "verbatim", stop) is None
    assert decide_partial(" kitchen Pass", "kitchen", "contains", stop) is True
    assert decide_partial("hallway\nkitchen", "kitchen", "contains", ["\n"]) is False


@pytest.mark.parametrize("metric", list(Metric))
@pytest.mark.parametrize("stop", [[], ["\n"], ["\n", "Passage:"]])
def test_an_early_decision_is_the_final_outcome(metric, stop):
    """For every prefix of random continuations: decide_partial is None or the outcome of the
    whole continuation."""
    rng = random.Random(1)
    pieces = ["kitchen", " ", "\n", "Pass", "age:", "apple", ",", "milk", "caf", "é", "e",
              "\u0301", "x", ".", "the", "Kitchen"]
    answers = ["kitchen", " kitchen", "apple,milk", "café"]
    for _ in range(150):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        for answer in answers:
            outcome = is_correct(text, answer, metric, stop)
            for n in range(len(text) + 1):
                early = decide_partial(text[:n], answer, metric, stop)
                assert early is None or early == outcome, (text[:n], text, answer)


def test_final_once_the_budget_is_spent_or_at_eos():
    ev = EvalConfig(metric=Metric.exact, max_new_tokens=2)
    assert final_or_verdict("hallway", [5, 6], "hallway", ev, eos=2) is True
    assert final_or_verdict("hallway", [5], "hallway", ev, eos=2) is None
    assert final_or_verdict("hallway", [5, 2], "hallway", EvalConfig(max_new_tokens=5),
                            eos=2) is True

"""How a greedy continuation is scored against the gold answer: pure functions, no torch.

Seven metrics (:class:`.schema.Metric`):

- ``contains`` (the notebook's): every word of the answer is a word of the continuation;
- ``exact``: the continuation's first words are the answer's words;
- ``quasi_exact``: HELM's ``quasi_exact_match``, equality after HELM's ``normalize_text``;
- ``verbatim``: lm-evaluation-harness's ``exact_match`` as its ``babi`` task uses it: the
  continuation equals the target (``" <answer>"``) character for character;
- ``helm_exact``, ``prefix_exact``, ``quasi_prefix_exact``: HELM's ``exact_match``,
  ``prefix_exact_match`` and ``quasi_prefix_exact_match`` (:data:`HELM_METRICS` names all four
  of HELM's; :func:`helm_scores` gives them for one continuation: results.csv's columns of
  ``eval.format=helm`` jobs).

Before any metric the continuation is cut at the first stop string (``eval.stop``), as
HELM's clients and lm-eval's models cut theirs.

Words (``contains``, ``exact``) are Unicode-aware so that answers in every language the
config allows score (``data.lang``: en, hn, shuffled, ...): a word is a maximal run of word
characters in the sense of Unicode Technical Standard #18, *Unicode Regular Expressions*,
Annex C (``\\w`` = Alphabetic, Mark, Decimal_Number, Connector_Punctuation, Join_Control),
taken by general category: letters (L*), marks (M*), numbers (N*), connector punctuation
(Pc) and the join controls ZWNJ/ZWJ (U+200C, U+200D). Python's ``re`` ``\\w`` (the seed's
``\\w+``) lacks the marks, so a Devanagari word such as ``रसोई`` (its vowel signs are
categories Mc/Mn) fell apart into pieces and a right answer scored as wrong. The new
characters are a superset of Python's ``\\w`` (tested), so English scores do not change.
Both texts are put in Unicode Normalization Form C first (Unicode Standard Annex #15):
canonical composition only, so a decomposed ``e`` + U+0301 and a precomposed ``é`` are the
same word, while compatibility forms stay distinct (NFKC would also fold ``ﬁ`` into ``fi``,
full-width letters, superscript digits: different characters to a reader, and not what a
model that wrote them meant). NFC is the form W3C's *Character Model for the World Wide Web:
String Matching* recommends for matching text. ``quasi_exact``, HELM's other metrics and
``verbatim`` follow their sources exactly (no NFC), so that their numbers stay comparable with
published ones.

Exactness of the evaluator's early decisions (:func:`decide_partial`) rests on the decoded
text of a token prefix being a prefix of the decoded text of the whole continuation, except
for trailing U+FFFD characters (a byte-fallback tokenizer's incomplete UTF-8 character,
which later tokens complete): those are treated as unknown.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence

from ih_sweep.config.schema import EvalConfig, Metric

__all__ = ["HELM_METRICS", "cut_at_stop", "decide_partial", "exact_match", "final_or_verdict",
           "helm_scores", "is_correct", "is_word_char", "normalize_text", "prefix_exact_match",
           "quasi_exact_match", "quasi_prefix_exact_match", "stop_seen", "words"]

JOIN_CONTROLS = frozenset("\u200c\u200d")  # ZWNJ, ZWJ: inside Indic and Arabic words
REPLACEMENT = "\ufffd"  # what a decoder shows for bytes of a character not complete yet


# --------------------------------------------------------------------------- words
def is_word_char(ch: str) -> bool:
    """Whether ``ch`` (one character) belongs to a word: a letter, mark, number, connector
    punctuation or join control (UTS #18 Annex C ``\\w``, by general category)."""
    category = unicodedata.category(ch)
    return category[0] in "LMN" or category == "Pc" or ch in JOIN_CONTROLS


def words(text: str) -> list[str]:
    """The words of ``text`` in NFC: maximal runs of :func:`is_word_char` characters.
    ``words("the hallway.") == ["the", "hallway"]``; ``words("बगीचा में")`` keeps the vowel
    signs inside their words."""
    out: list[str] = []
    start = None
    text = unicodedata.normalize("NFC", text)
    for i, ch in enumerate(text):
        if is_word_char(ch):
            if start is None:
                start = i
        elif start is not None:
            out.append(text[start:i])
            start = None
    if start is not None:
        out.append(text[start:])
    return out


# --------------------------------------------------------------------------- stop strings
def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(found) if found else None


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (all of it when none occurs).

    HELM (``clients/client.py`` truncate_sequence) and lm-eval (``models/utils.py``
    postprocess_generated_text) cut at each stop string in list order; for stop strings that
    cannot overlap (:func:`ih_sweep.config.rules.check` refuses others) that is the same cut."""
    at = _first_stop(text, stop)
    return text if at is None else text[:at]


def _pending(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that later text could complete to a stop
    string (a proper prefix of one)."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def stop_seen(text: str, stop: Sequence[str]) -> bool:
    """Whether the decoded ``text`` of a token prefix already ends the continuation: a stop
    string lies in it before any end that later tokens could still change (trailing U+FFFD,
    or the beginning of another stop string). Later tokens then cannot change the cut."""
    stable = text.rstrip(REPLACEMENT)
    at = _first_stop(stable, stop)
    return at is not None and at < len(stable) - _pending(stable, stop)


# --------------------------------------------------------------------------- HELM
def normalize_text(text: str, should_remove_articles: bool = True) -> str:
    """HELM's ``normalize_text`` (stanford-crfm/helm, commit 63754d05,
    ``src/helm/benchmark/metrics/evaluate_reference_metrics.py``, copied from the QuAC
    scorer): lower-case, delete ASCII punctuation (not replaced by a space), replace the
    words a/an/the by a space, collapse whitespace."""

    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    normalized = remove_punc(text.lower())
    if should_remove_articles:
        normalized = remove_articles(normalized)
    return white_space_fix(normalized)


# HELM's four reference metrics for babi_qa (run_specs/classic_run_specs.py get_babi_qa_spec:
# get_exact_match_metric_specs), by the name HELM reports (results.csv's columns), with the
# eval.metric value that makes each one decide ``correct``
HELM_METRICS = {"exact_match": "helm_exact", "quasi_exact_match": "quasi_exact",
                "prefix_exact_match": "prefix_exact",
                "quasi_prefix_exact_match": "quasi_prefix_exact"}


# Each of HELM's metrics below takes the completion as HELM hands it over:
# ``compute_reference_metrics`` strips every completion (``completion.text.strip()``) before
# the metric sees it, and each metric scores an empty prediction 0. Same file and commit as
# :func:`normalize_text`.
def exact_match(gold: str, pred: str) -> bool:
    """HELM's ``exact_match``: ``gold.strip() == pred.strip()`` (no case or punctuation
    folding); an empty (stripped) prediction scores 0."""
    pred = pred.strip()
    if not pred:
        return False
    return gold.strip() == pred


def quasi_exact_match(gold: str, pred: str) -> bool:
    """HELM's ``quasi_exact_match``: ``normalize_text(gold) == normalize_text(pred)``; an
    empty (stripped) prediction scores 0."""
    pred = pred.strip()
    if not pred:
        return False
    return normalize_text(gold) == normalize_text(pred)


def prefix_exact_match(gold: str, pred: str) -> bool:
    """HELM's ``prefix_exact_match``: the stripped prediction begins with the stripped gold
    (``"kitchen garden"`` scores for ``kitchen``, and so does ``"kitchens"``: a character
    prefix, not a word prefix); an empty (stripped) prediction scores 0."""
    pred = pred.strip()
    if not pred:
        return False
    return pred.startswith(gold.strip())


def quasi_prefix_exact_match(gold: str, pred: str) -> bool:
    """HELM's ``quasi_prefix_exact_match``: ``normalize_text(pred)`` begins with
    ``normalize_text(gold)``; an empty (stripped) prediction scores 0."""
    pred = pred.strip()
    if not pred:
        return False
    return normalize_text(pred).startswith(normalize_text(gold))


HELM_FUNCTIONS = {"exact_match": exact_match, "quasi_exact_match": quasi_exact_match,
                  "prefix_exact_match": prefix_exact_match,
                  "quasi_prefix_exact_match": quasi_prefix_exact_match}


def helm_scores(continuation: str, answer: str, stop: Sequence[str] = ()) -> dict[str, bool]:
    """HELM's four metrics (:data:`HELM_METRICS`, by HELM's names) of ``continuation`` cut at
    ``stop`` (:func:`cut_at_stop`) against ``answer`` (whitespace around it does not count:
    HELM strips the gold in each metric or in ``normalize_text``)."""
    text = cut_at_stop(continuation, stop)
    return {name: fn(answer, text) for name, fn in HELM_FUNCTIONS.items()}


# --------------------------------------------------------------------------- metrics
def _allowed() -> str:
    return ", ".join(str(m) for m in Metric)


def is_correct(continuation: str, answer: str, metric: str, stop: Sequence[str] = ()) -> bool:
    """Whether ``continuation`` (the decoded greedy tokens) answers ``answer``.

    ``answer``: the gold continuation as the prompt format expects it (``Item.target``:
    the notebook's ``kitchen``, HELM's and lm-eval's `` kitchen``); ``contains``, ``exact``
    and ``quasi_exact`` ignore the whitespace around it, ``verbatim`` compares it character
    for character. The continuation is first cut at ``stop`` (:func:`cut_at_stop`).

    - ``contains`` (the seed's): every word of the answer is among the :func:`words` of the
      continuation (for bAbI's answers, single words or comma-separated lists of them, the
      answer's words are the seed's comma-separated parts; an answer without a word is never
      matched, as the seed's parts could not be);
    - ``exact``: the continuation's first words are the answer's words;
    - ``quasi_exact``: :func:`quasi_exact_match`;
    - ``verbatim``: lm-eval's ``exact_match`` (EleutherAI/lm-evaluation-harness, commit
      4e7e0d47, ``lm_eval/api/metrics.py`` exact_match_hf_evaluate with its defaults: no
      case, punctuation or number folding): the cut continuation equals ``answer``;
    - ``helm_exact``, ``prefix_exact``, ``quasi_prefix_exact``: :func:`exact_match`,
      :func:`prefix_exact_match`, :func:`quasi_prefix_exact_match`.

    Raises ValueError for another metric."""
    text = cut_at_stop(continuation, stop)
    if metric in (Metric.contains, Metric.exact):
        parts = words(answer)
        got = words(text)
        if not parts:  # nothing to find (the seed's comma split could never match either)
            return False
        if metric == Metric.contains:
            return all(p in got for p in parts)
        return got[:len(parts)] == parts
    if metric == Metric.quasi_exact:
        return quasi_exact_match(answer, text)
    if metric == Metric.verbatim:
        return text == answer
    helm = {v: k for k, v in HELM_METRICS.items()}
    if metric in helm:
        return HELM_FUNCTIONS[helm[metric]](answer, text)
    raise ValueError(f"eval.metric={metric!r}; allowed values: {_allowed()}")


def decide_partial(text: str, answer: str, metric: str, stop: Sequence[str] = ()
                   ) -> bool | None:
    """The outcome from a known *prefix* ``text`` of the greedy continuation, or None while
    later tokens could still change it.

    A stop string inside the known text ends the continuation: the outcome is final. Else
    the final cut continuation begins with ``known``: ``text`` less trailing U+FFFD
    (characters not decoded yet) and less an end that could grow into a stop string. For
    ``contains`` and ``exact`` a word of ``known`` is final once a non-word character follows
    it (while the last character is a letter, mark, number, ``_`` or join control the word
    may still grow; a non-word character never composes with a later mark into a word
    character under NFC, tested); ``verbatim`` is False once ``known`` is not a prefix of
    the answer; ``quasi_exact`` and HELM's other metrics wait for the end (normalisation can
    join and drop words, and the stripped end decides ``helm_exact`` and the prefixes)."""
    if stop_seen(text, stop):
        return is_correct(text, answer, metric, stop)
    stable = text.rstrip(REPLACEMENT)
    known = stable[:len(stable) - _pending(stable, stop)]
    if metric == Metric.verbatim:
        return None if answer.startswith(known) else False
    if metric in HELM_METRICS.values():
        return None
    if metric not in (Metric.contains, Metric.exact):
        raise ValueError(f"eval.metric={metric!r}; allowed values: {_allowed()}")
    got = words(known)
    if known and is_word_char(known[-1]):
        got = got[:-1]  # the last word may still grow
    parts = words(answer)
    if not parts:
        return False
    if metric == Metric.contains:
        return True if all(p in got for p in parts) else None
    if len(got) >= len(parts):
        return got[:len(parts)] == parts
    if got and got != parts[:len(got)]:
        return False
    return None


def final_or_verdict(text: str, toks: Sequence[int], answer: str, settings: EvalConfig,
                     eos: int | None, whole: bool = False) -> bool | None:
    """The outcome from known greedy tokens ``toks`` (decoded: ``text``): final once the
    budget (``settings.max_new_tokens``) is spent or the last token is ``eos``, else
    :func:`decide_partial`, None when later tokens could still change it. ``whole``: None
    until the continuation itself has ended (budget, ``eos`` or a stop string), whatever the
    metric, so that every metric can be read off the text (:func:`helm_scores`)."""
    if len(toks) >= settings.max_new_tokens or (eos is not None and toks[-1] == eos):
        return is_correct(text, answer, settings.metric, settings.stop)
    if whole and not stop_seen(text, settings.stop):
        return None
    return decide_partial(text, answer, settings.metric, settings.stop)

"""Difficulty strata of a bAbI question, read from its story alone, and accuracy per stratum.

Per item (:func:`item_strata`, the results.csv columns of the same names):

- ``support_distance``: how many statements back the latest supporting fact lies (1 = the
  statement just before the question; questions are not statements). bAbI lines carry the
  ids of their supporting facts (the released files and the built-in generator alike); the
  latest one counts. Empty when the question names no supporting fact found in the story.
- ``recency_correct``: whether "the most recent location of anyone", the location the last
  statement before the question moves someone to, is the gold answer: how far the shortcut
  of answering with the last-mentioned place gets. Defined when the question is
  ``Where is <Name>?`` and that statement is a bAbI move (``... moved | went | went back |
  journeyed | travelled to the <place>.``): every task-1 question; also tasks 11-13, whose
  moves name their subject as a pronoun or a pair. Empty otherwise (a question about an
  object, a yes/no question, a last statement that moves nobody).
- ``mentions``: how many times the asked person's name occurs in the statements before the
  question (pronouns not counted). The asked person is the one capitalized word of the
  question after its first word (``Where is Mary?``, ``Is Bill in the office?``,
  ``How many objects is Sandra carrying?``); empty when there is none (``Where is the
  football?``, task 15's lowercase names) or more than one (``What did Fred give to
  Jeff?``).
- ``question_position``: the 0-based index of the question among the story's questions.

Pure functions of the story. The summary aggregates them per condition and N
(:func:`ih_sweep.report.summarize.strata_table`: strata.csv, the summary.md section, strata.png).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pandas as pd

from ih_sweep.data.sources import MOVE_PHRASES, Story
from ih_sweep.pipeline.records import STRATA_COLUMNS

# a bAbI move ending a statement: "<anyone> <phrase> the <place>." (task 1's five phrases)
_MOVE = re.compile(r"\b(?:" + "|".join(re.escape(p) for p in sorted(MOVE_PHRASES, key=len,
                                                                   reverse=True))
                   + r") the (\w+)\.?$")
_WHERE_PERSON = re.compile(r"^Where is ([A-Z]\w*)\s*\?$")
_WORD = re.compile(r"[A-Za-z]+")


def _asked_person(question: str) -> str | None:
    names = {w for w in _WORD.findall(question)[1:] if w[0].isupper()}
    return names.pop() if len(names) == 1 else None


def item_strata(story: Story, item: Any) -> dict[str, Any]:
    """The four strata of one question: ``item`` is a :class:`ih_sweep.data.Item` (or
    anything with ``line``, the question's index into the story's lists). Values are int,
    bool or None (empty: not defined for this question, see the module docstring).
    Raises ValueError when ``item.line`` is not a question of ``story``."""
    line = int(item.line)
    if not 0 <= line < len(story["type"]) or story["type"][line] != 1:
        raise ValueError(f"line {line} of the story is not a question")
    statements = [i for i in range(line) if story["type"][i] == 0]
    where = {story["id"][i]: i for i in range(line)}
    support = [where[s] for s in story["supporting_ids"][line] if s in where]
    distance = sum(1 for i in statements if i >= max(support)) if support else None
    question = story["text"][line].strip()
    recency = None
    if _WHERE_PERSON.match(question) and statements:
        move = _MOVE.search(story["text"][statements[-1]].strip())
        if move:
            recency = move.group(1) == story["answer"][line].strip()
    person = _asked_person(question)
    mentions = None if person is None else sum(
        _WORD.findall(story["text"][i]).count(person) for i in statements)
    return {"support_distance": distance, "recency_correct": recency, "mentions": mentions,
            "question_position": sum(1 for i in range(line) if story["type"][i] == 1)}


def strata_frame(stories: Sequence[Story], items: Sequence[Any]) -> pd.DataFrame:
    """:func:`item_strata` of each item (``items[k].story_index`` into ``stories``), one row
    each in :data:`~ih_sweep.pipeline.records.STRATA_COLUMNS`; empty values are missing (nullable
    integer and boolean columns)."""
    rows = [item_strata(stories[it.story_index], it) for it in items]
    df = pd.DataFrame(rows, columns=STRATA_COLUMNS)
    return df.astype({"support_distance": "Int64", "recency_correct": "boolean",
                      "mentions": "Int64", "question_position": "Int64"})

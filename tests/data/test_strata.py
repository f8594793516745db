"""Difficulty strata from the stories: hand-built stories with known counts, the real qa1
test file, the per-stratum table and its figure, and the columns of a job's results.csv."""

from __future__ import annotations

import pytest
from conftest import BABI, needs_babi

from ih_sweep.data import Item, generate_stories, load_babi_file, make_items, parse_babi_lines
from ih_sweep.data.strata import item_strata, strata_frame
from ih_sweep.pipeline.records import STRATA_COLUMNS

STORY = parse_babi_lines("""\
1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Daniel went back to the hallway.
5 Mary travelled to the office.
6 Where is Mary? \toffice\t5
7 John journeyed to the garden.
8 Sandra moved to the garden.
9 Daniel went to the kitchen.
10 Mary went to the bedroom.
11 Sandra travelled to the kitchen.
12 Where is John? \tgarden\t7
""".splitlines())[0]


def _item(line: int) -> Item:
    return Item(0, 0, line, 0, "", "")


def test_strata_of_a_hand_built_story():
    """Question 1: its fact is 2 statements back, the last place named (hallway) is wrong,
    Mary is named once. Question 2: 1 back, the last place is the answer, Mary named twice.
    Question 3: 5 statements back (questions not counted), the last move (Sandra to the
    kitchen) is wrong, John named twice before it."""
    assert item_strata(STORY, _item(2)) == {"support_distance": 2, "recency_correct": False,
                                            "mentions": 1, "question_position": 0}
    assert item_strata(STORY, _item(5)) == {"support_distance": 1, "recency_correct": True,
                                            "mentions": 2, "question_position": 1}
    assert item_strata(STORY, _item(11)) == {"support_distance": 5, "recency_correct": False,
                                             "mentions": 2, "question_position": 2}
    with pytest.raises(ValueError, match="not a question"):
        item_strata(STORY, _item(0))


def test_other_tasks_get_what_is_defined():
    """qa2 (an object is asked): distance from the latest of two facts, no recency, no
    person; qa6 (yes/no): the person is counted, no recency; qa11 (a pronoun moves): recency
    from the move, the pronoun is not a mention; no supporting ids: no distance."""
    qa2 = parse_babi_lines([
        "1 Mary got the milk there.", "2 John moved to the bedroom.",
        "3 Mary went to the kitchen.", "4 Where is the milk? \tkitchen\t1 3"])[0]
    assert item_strata(qa2, _item(3)) == {"support_distance": 1, "recency_correct": None,
                                          "mentions": None, "question_position": 0}
    qa6 = parse_babi_lines(["1 John went to the kitchen.", "2 Mary went to the office.",
                            "3 Is John in the kitchen? \tyes\t1"])[0]
    assert item_strata(qa6, _item(2)) == {"support_distance": 2, "recency_correct": None,
                                          "mentions": 1, "question_position": 0}
    qa11 = parse_babi_lines(["1 Mary went to the garden.", "2 Then she moved to the office.",
                             "3 Where is Mary? \toffice\t1 2"])[0]
    assert item_strata(qa11, _item(2)) == {"support_distance": 1, "recency_correct": True,
                                           "mentions": 1, "question_position": 0}
    qa5 = parse_babi_lines(["1 Fred gave the apple to Jeff.",
                            "2 What did Fred give to Jeff? \tapple\t1"])[0]
    qa5["supporting_ids"][1] = []
    assert item_strata(qa5, _item(1)) == {"support_distance": None, "recency_correct": None,
                                          "mentions": None, "question_position": 0}


def test_generated_stories_agree_with_their_own_bookkeeping():
    """The generator asks about one of the last five statements' actors (support distance
    1-5 by construction) and moves someone in every statement (recency always defined)."""
    stories = generate_stories(200, seed=1)
    df = strata_frame(stories, make_items(stories, "all"))
    assert list(df.columns) == STRATA_COLUMNS and len(df) == 1000
    assert df["support_distance"].between(1, 5).all()
    assert df["recency_correct"].notna().all() and df["mentions"].ge(1).all()
    assert (df["question_position"].to_numpy() == [0, 1, 2, 3, 4] * 200).all()
    # the last place named is right when the support is the statement just before, and
    # otherwise only when someone else moved to the asked person's room last
    last = df["support_distance"] == 1
    assert df.loc[last, "recency_correct"].all()
    assert 0 < df.loc[~last, "recency_correct"].mean() < 0.35


@needs_babi
def test_the_real_qa1_test_file_has_plausible_strata():
    """bAbI's en qa1 test: 1000 questions; the supporting fact is recent (the generator asks
    about one of the last few moves), often the last statement; every question asks a
    person named before it."""
    stories = load_babi_file(BABI / "en" / "qa1_single-supporting-fact_test.txt")
    df = strata_frame(stories, make_items(stories, "all"))
    assert len(df) == 1000
    dist = df["support_distance"].value_counts(normalize=True)
    assert df["support_distance"].between(1, 5).all() and 0.3 < dist[1] < 0.7
    assert df["support_distance"].median() <= 2
    assert df["recency_correct"].notna().all()
    # the last place named is right when the support is the last statement, and sometimes
    # otherwise (that place can be where the asked person went earlier)
    last = df["support_distance"] == 1
    assert df.loc[last, "recency_correct"].all()
    assert df["recency_correct"].mean() > last.mean()
    assert df["mentions"].ge(1).all() and df["mentions"].max() <= 10
    assert set(df["question_position"]) == {0, 1, 2, 3, 4}

from __future__ import annotations

import random
from collections import Counter

import pytest
from conftest import BABI, FIXTURES, needs_babi

from ih_sweep import data

SEED_EXAMPLE = (
    "Read the following passage and answer the questions with a single word.\n\nPassage: Mary "
    "moved to the bathroom.\nJohn went to the hallway.\n\nQuestion: Where is Mary?\nAnswer: "
    "bathroom\nPassage: Daniel went back to the hallway.\nSandra moved to the garden.\n\n"
    "Question: Where is Daniel?\nAnswer: hallway\nPassage: John moved to the office.\nSandra "
    "journeyed to the bathroom.\n\nQuestion: Where is Daniel?\nAnswer: hallway\nPassage: Mary "
    "moved to the hallway.\nDaniel travelled to the office.\n\nQuestion: Where is Daniel?\n"
    "Answer: office\nPassage: John went back to the garden.\nJohn moved to the bedroom.\n\n"
    "Question: Where is Sandra?\nAnswer: ")

FIRST_STORY_TEXT = [
    "Mary moved to the bathroom.", "John went to the hallway.", "Where is Mary?",
    "Daniel went back to the hallway.", "Sandra moved to the garden.", "Where is Daniel?",
    "John moved to the office.", "Sandra journeyed to the bathroom.", "Where is Daniel?",
    "Mary moved to the hallway.", "Daniel travelled to the office.", "Where is Daniel?",
    "John went back to the garden.", "John moved to the bedroom.", "Where is Sandra?"]
FIRST_STORY_ANSWERS = ["bathroom", "hallway", "hallway", "office", "bathroom"]


def first_story() -> data.Story:
    answers = iter(FIRST_STORY_ANSWERS)
    types = [1 if t.startswith("Where") else 0 for t in FIRST_STORY_TEXT]
    return {"id": [str(i + 1) for i in range(15)], "type": types, "text": FIRST_STORY_TEXT,
            "supporting_ids": [[] for _ in types],
            "answer": [next(answers) if t else "" for t in types]}


def test_prompt_reproduces_seed_example_byte_for_byte():
    assert data.build_prompt(first_story()) == SEED_EXAMPLE


@needs_babi
def test_prompt_from_real_file_matches_seed_example():
    stories = data.load_babi_file(BABI / "en-10k" / "qa1_single-supporting-fact_train.txt")
    assert data.build_prompt(stories[0]) == SEED_EXAMPLE


def test_prompt_for_earlier_question_and_other_shapes():
    s = data.parse_babi_lines((FIXTURES / "qa8_tiny.txt").read_text().splitlines())[0]
    p = data.build_prompt(s, 2)
    assert p.endswith("Passage: Mary picked up the apple.\nMary grabbed the football.\n\n"
                      "Question: What is Mary carrying?\nAnswer: ")
    full = data.build_prompt(s)
    assert "Answer: apple,football\nPassage: Mary dropped the apple.\n" in full
    with pytest.raises(ValueError, match="not a question"):
        data.build_prompt(s, 0)


def test_parse_fixture_schema_and_space_before_tab():
    stories = data.load_babi_file(FIXTURES / "qa1_tiny.txt")
    assert len(stories) == 2
    s = stories[0]
    assert s["id"] == ["1", "2", "3", "4", "5", "6"]
    assert s["type"] == [0, 0, 1, 0, 0, 1]
    assert s["text"][2] == "Where is Mary?"  # the raw file's space before TAB is gone
    assert s["answer"] == ["", "", "bathroom", "", "", "hallway"]
    assert s["supporting_ids"] == [[], [], ["1"], [], [], ["4"]]
    assert stories[1]["answer"] == ["", "office"]


def test_list_answers_and_several_supporting_ids():
    s = data.load_babi_file(FIXTURES / "qa8_tiny.txt")[0]
    assert s["answer"][2] == "apple,football"
    assert s["supporting_ids"][2] == ["1", "2"]


@pytest.mark.parametrize("name,match", [("bad_line.txt", r"bad_line.txt:2: expected 'ID text'"),
                                        ("bad_question.txt", r"bad_question.txt:2: a question")])
def test_malformed_lines_name_file_and_line(name, match):
    with pytest.raises(data.DataError, match=match):
        data.load_babi_file(FIXTURES / name)


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(data.DataError, match="no such file"):
        data.load_babi_file(tmp_path / "nope.txt")
    with pytest.raises(data.DataError, match="data.task=21 is unknown"):
        data.babi_file(tmp_path, "en", 21, "train")
    with pytest.raises(data.DataError, match="no folder en/ in it"):
        data.babi_file(tmp_path, "en", 1, "train")
    (tmp_path / "en").mkdir()
    with pytest.raises(data.DataError, match="no qa1_single-supporting-fact_train.txt or "
                                             "qa1_train.txt"):
        data.babi_file(tmp_path, "en", 1, "train")
    with pytest.raises(data.DataError, match="data.split='dev'"):
        data.babi_file(tmp_path, "en", 1, "dev")


def test_archive_loader(tmp_path):
    import tarfile

    folder = tmp_path / "tasks_1-20_v1-2" / "en-10k"
    folder.mkdir(parents=True)
    (folder / "qa1_single-supporting-fact_test.txt").write_text(
        (FIXTURES / "qa1_tiny.txt").read_text())
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "tasks_1-20_v1-2", arcname="tasks_1-20_v1-2")
    stories = data.load_babi_archive(archive, "en-10k", 1, "test")
    assert len(stories) == 2 and stories[0]["answer"][2] == "bathroom"
    with pytest.raises(data.DataError, match="no en/"):
        data.load_babi_archive(archive, "en", 1, "test")


def test_hub_record_conversion_offline():
    from datasets import Dataset

    story = {"id": ["1", "2", "3"], "type": [0, 0, 1],
             "text": ["Mary moved to the bathroom.", "John went to the hallway.",
                      "Where is Mary?"],
             "supporting_ids": [[], [], ["1"]], "answer": ["", "", "bathroom"]}
    ds = Dataset.from_list([{"story": story}])
    out = data.stories_from_hub_records(ds)
    assert out == [story]


def test_generator_is_deterministic_and_well_formed():
    a = data.generate_stories(50, seed=3)
    assert a == data.generate_stories(50, seed=3)
    assert a != data.generate_stories(50, seed=4)
    for s in a:
        assert len(s["text"]) == 15
        assert s["type"] == [0, 0, 1] * 5
        assert s["id"] == [str(i) for i in range(1, 16)]
    with pytest.raises(data.DataError, match="task 1 only"):
        data.generate_stories(1, task=2)


def _stats(stories):
    back, recent, n, answers, actors, phrases, moves_same = Counter(), 0, 0, Counter(), Counter(), \
        Counter(), 0
    for s in stories:
        statements, where = [], {}
        for i, t in enumerate(s["type"]):
            if t == 0:
                words = s["text"][i].rstrip(".").split()
                actor, room = words[0], words[-1]
                moves_same += where.get(actor) == room
                where[actor] = room
                statements.append(s["id"][i])
                phrases[" ".join(words[1:-2])] += 1
                continue
            actor = s["text"][i].split()[-1].rstrip("?")
            assert s["answer"][i] == where[actor]
            back[len(statements) - statements.index(s["supporting_ids"][i][0])] += 1
            recent += s["text"][i - 1].rstrip(".").split()[-1] == s["answer"][i]
            answers[s["answer"][i]] += 1
            n += 1
        actors[len({s["text"][i].split()[0] for i, t in enumerate(s["type"]) if t == 0})] += 1
    return back, recent / n, answers, actors, phrases, moves_same, n


def test_generator_matches_released_statistics():
    stories = data.generate_stories(4000, seed=0)
    back, recent, answers, actors, phrases, moves_same, n = _stats(stories)
    released = {1: 45.2, 2: 29.0, 3: 13.3, 4: 8.6, 5: 4.0}
    for k, pct in released.items():
        assert abs(100 * back[k] / n - pct) < 1.5, (k, 100 * back[k] / n)
    assert abs(100 * recent - 54.2) < 1.5
    for room in data.LOCATIONS:
        assert 15.0 < 100 * answers[room] / n < 18.5
    total = len(stories)
    assert abs(100 * actors[4] / total - 78) < 2.5
    assert abs(100 * actors[3] / total - 21) < 2.5
    assert 100 * actors[2] / total < 1.5
    for phrase in data.MOVE_PHRASES:
        assert 18.5 < 100 * phrases[phrase] / sum(phrases.values()) < 21.5
    assert moves_same == 0


@needs_babi
def test_real_files_counts():
    stories = data.load_babi_file(BABI / "en-10k" / "qa1_single-supporting-fact_train.txt")
    assert len(stories) == 2000
    assert sum(t for s in stories for t in s["type"]) == 10000
    for lang in ("en", "en-10k"):
        for task in range(1, 21):
            s = data.load_babi_file(data.babi_file(BABI, lang, task, "test"))
            assert sum(t for st in s for t in st["type"]) == 1000, (lang, task)


@needs_babi
def test_generator_matches_the_real_file_statistics():
    real = data.load_babi_file(BABI / "en-10k" / "qa1_single-supporting-fact_train.txt")
    gen = data.generate_stories(2000, seed=1)
    rb, rr, *_ = _stats(real)
    gb, gr, *_ = _stats(gen)
    assert abs(rr - gr) < 0.03
    for k in range(1, 6):
        assert abs(rb[k] - gb[k]) / 10000 < 0.025


def test_items_scope_last_and_all():
    stories = data.generate_stories(3, seed=0)
    last = data.make_items(stories, "last")
    assert [(i.story_index, i.question_index, i.examples_before) for i in last] == [
        (0, 4, 4), (1, 4, 4), (2, 4, 4)]
    assert last[0].prompt == data.build_prompt(stories[0])
    every = data.make_items(stories, "all")
    assert len(every) == 15
    assert [i.examples_before for i in every[:5]] == [0, 1, 2, 3, 4]
    assert every[4] == last[0]
    with pytest.raises(ValueError, match="allowed values: last, all"):
        data.make_items(stories, "first")


def test_load_stories_configs(tmp_path):
    from ih_sweep.config.schema import DataConfig

    gen = data.load_stories(DataConfig(name="babi_generated", n_stories=5, seed=2))
    assert gen == data.generate_stories(5, 2)
    root = tmp_path / "babi" / "en"
    root.mkdir(parents=True)
    (root / "qa1_single-supporting-fact_test.txt").write_text(
        (FIXTURES / "qa1_tiny.txt").read_text())
    got = data.load_stories(DataConfig(name="babi_files", path=str(tmp_path / "babi"),
                                       lang="en", split="test", n_stories=1))
    assert len(got) == 1


def test_rng_story_uses_all_phrases_on_first_mention():
    rng = random.Random(0)
    firsts = Counter()
    for _ in range(2000):
        s = data.generate_qa1_story(rng)
        firsts[" ".join(s["text"][0].rstrip(".").split()[1:-2])] += 1
    assert set(firsts) == set(data.MOVE_PHRASES)


QA1 = (FIXTURES / "qa1_tiny.txt").read_text()


@pytest.mark.parametrize("edit", [
    lambda t: t.replace("\n", "\r\n"),  # Windows
    lambda t: t.replace("\n", "\r"),  # old Mac
    lambda t: "\ufeff" + t,  # a byte-order mark
    lambda t: t + "\n\n\n",  # trailing blank lines
    lambda t: t.replace("\n", " \n"),  # trailing spaces
    lambda t: t.replace("\t", " \t "),  # spaces around the tabs
])
def test_files_as_other_editors_save_them_parse_alike(tmp_path, edit):
    path = tmp_path / "qa1.txt"
    path.write_bytes(edit(QA1).encode("utf-8"))
    assert data.load_babi_file(path) == data.load_babi_file(FIXTURES / "qa1_tiny.txt")


@pytest.mark.parametrize("content,match", [
    (b"", "no story in it"), (b"\n\n", "no story in it"),
    (b"\x00\x01\x02\xff\xfe", "not UTF-8 text"), (b"1 a\x00b\n", "NUL bytes"),
    (b"1 Mary went to the office.\n2 John went home.\n", r"qa1.txt:1: the story starting "
                                                          r"here has no question"),
    (b"1 Where is Mary?\t\t1\n", r"qa1.txt:1: a question line needs"),
])
def test_damaged_files_name_file_and_line(tmp_path, content, match):
    path = tmp_path / "qa1.txt"
    path.write_bytes(content)
    with pytest.raises(data.DataError, match=match):
        data.load_babi_file(path)


def test_the_en_valid_layout_and_split(tmp_path):
    folder = tmp_path / "en-valid"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"qa1_{split}.txt").write_text(QA1)
    for split in ("train", "valid", "test"):
        assert data.babi_file(tmp_path, "en-valid", 1, split) == folder / f"qa1_{split}.txt"


@needs_babi
def test_every_real_file_loads():
    for path in sorted(BABI.glob("*/qa*_*.txt")):
        stories = data.load_babi_file(path)
        assert stories and all(1 in s["type"] for s in stories), path

"""Prompt formats (eval=helm, eval=lm_eval): prompt text, demo draws, and the evaluator's
per-item equality with one-at-a-time generate under their stop strings and metrics."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from compose_config import compose
from conftest import BABI

from ih_sweep import data
from ih_sweep.config.hydra import settings
from ih_sweep.config.schema import DataConfig, EvalConfig
from ih_sweep.evaluation.evaluator import PromptTooLong, check_prompt_lengths, evaluate
from ih_sweep.evaluation.metrics import HELM_METRICS, cut_at_stop, helm_scores, is_correct
from ih_sweep.testing import generate_one_at_a_time

ROOT = Path(__file__).resolve().parents[2]


def story(*lines: tuple[str, str]) -> data.Story:
    """A story from (text, answer) pairs; an answer marks a question."""
    st: data.Story = {"id": [], "type": [], "text": [], "supporting_ids": [], "answer": []}
    for i, (text, answer) in enumerate(lines, start=1):
        data.append_line(st, i, 1 if answer else 0, text, [], answer)
    return st


ASKED = story(("Mary moved to the bathroom.", ""), ("John went to the hallway.", ""),
              ("Where is Mary?", "bathroom"), ("Daniel went back to the hallway.", ""),
              ("Mary travelled to the office.", ""), ("Where is Mary?", "office"))
GARDEN = story(("Sandra journeyed to the garden.", ""), ("Where is Sandra?", "garden"))
KITCHEN = story(("John moved to the kitchen.", ""), ("Where is John?", "kitchen"))


# --------------------------------------------------------------------------- prompt text
def test_helm_prompt_byte_for_byte():
    """Two demos (answers by frequency: garden twice, then kitchen), blocks joined by a
    newline, earlier questions left out of the passage, the asked block ending "Answer:"."""
    pool = data.qa_pool([GARDEN, KITCHEN, GARDEN], task=1)
    items = data.make_qa_items([ASKED], "all", "helm", pool, n_shots=2, seed=0, task=1)
    assert [it.answer for it in items] == ["bathroom", "office"]
    assert [it.target for it in items] == [" bathroom", " office"]
    assert items[1].prompt == (
        "Passage: Sandra journeyed to the garden.\n"
        "Question: Where is Sandra?\n"
        "Answer: garden\n"
        "\n"
        "Passage: John moved to the kitchen.\n"
        "Question: Where is John?\n"
        "Answer: kitchen\n"
        "\n"
        "Passage: Mary moved to the bathroom.\n"
        "John went to the hallway.\n"
        "Daniel went back to the hallway.\n"
        "Mary travelled to the office.\n"
        "Question: Where is Mary?\n"
        "Answer:")
    assert items[0].prompt.endswith("\n\nPassage: Mary moved to the bathroom.\n"
                                    "John went to the hallway.\nQuestion: Where is Mary?\n"
                                    "Answer:")
    assert {it.examples_before for it in items} == {2}


def test_lm_eval_prompt_byte_for_byte():
    """The harness's 0-shot prompt (its default), and a demo written text + target + blank
    line (target_delimiter "", fewshot_delimiter "\\n\\n")."""
    zero = data.make_qa_items([ASKED], "last", "lm_eval", [], n_shots=0, seed=1234, task=1)
    assert zero[0].prompt == ("Passage: Mary moved to the bathroom.\nJohn went to the hallway.\n"
                              "Daniel went back to the hallway.\nMary travelled to the office.\n"
                              "Question: Where is Mary?\nAnswer:")
    assert zero[0].target == " office"
    one = data.make_qa_items([ASKED], "last", "lm_eval", data.qa_pool([KITCHEN], 1),
                             n_shots=1, seed=1234, task=1)
    assert one[0].prompt == ("Passage: John moved to the kitchen.\nQuestion: Where is John?\n"
                             "Answer: kitchen\n\n" + zero[0].prompt)


def test_notebook_prompt_is_unchanged():
    items = data.items_for(DataConfig(n_stories=3, seed=4), EvalConfig())
    assert [it.prompt for it in items] == [data.build_prompt(s)
                                           for s in data.generate_stories(3, seed=4)]
    assert all(it.target == it.answer for it in items)


# --------------------------------------------------------------------------- demo draws
def test_helm_demos_follow_answer_frequency_and_cycle():
    pool = data.qa_pool([GARDEN] * 3 + [KITCHEN] * 2 + [ASKED], task=1)  # + bathroom, office
    answers = [d.answer for d in data.helm_demos(pool, 4, seed=0)]
    assert answers[:2] == ["garden", "kitchen"]
    assert sorted(answers[2:]) == ["bathroom", "office"]  # tied at one: shuffled by the seed
    assert [d.answer for d in data.helm_demos(pool, 6, seed=0)][4:] == ["garden", "kitchen"]
    assert len(data.helm_demos(pool, 50, seed=0)) == len(pool)


def test_helm_demos_are_chosen_once_and_deterministically():
    ev = EvalConfig(format="helm", metric="quasi_exact", scope="all", n_shots=5)
    a = data.items_for(DataConfig(n_stories=4, seed=2), ev)
    b = data.items_for(DataConfig(n_stories=4, seed=2), ev)
    assert [it.prompt for it in a] == [it.prompt for it in b]
    heads = {it.prompt.rsplit("\n\nPassage: ", 1)[0] for it in a}
    assert len(heads) == 1  # the same five demos before every question
    other = data.items_for(DataConfig(n_stories=4, seed=2), EvalConfig(
        format="helm", scope="all", n_shots=5, demo_seed=1))
    assert other[0].prompt != a[0].prompt


def test_lm_eval_demos_are_drawn_per_question_from_one_seeded_generator():
    pool = data.qa_pool(data.generate_stories(30, seed=9), task=1)
    stories = data.generate_stories(3, seed=2)
    items = data.make_qa_items(stories, "all", "lm_eval", pool, n_shots=2, seed=1234, task=1)
    rng = random.Random(1234)
    for it in items:
        demos = rng.sample(pool, 2)
        assert it.prompt.startswith("".join(data.qa_block(d, True) + "\n" for d in demos))
    assert len({it.prompt.split("\n\n")[0] for it in items}) > 1


def test_task_19_paths_become_words():
    assert data.helm_answer("s,w", 19) == "south west"
    assert data.helm_answer("s,w", 8) == "s,w"


def helm_instances(path: Path, task: int) -> list[tuple[str, str, str]]:
    """HELM's BabiQAScenario.get_instances loop (helm 63754d05), on one local file."""
    out = []
    with open(path) as f:
        facts = list(f)
        story_: list[str] = []
        for fact in facts:
            fid = int(fact.split(" ")[0])
            if fid == 1:
                story_ = []
            fact = " ".join(fact.split(" ")[1:])
            if "?" in fact:
                question, answer = fact.split("\t")[:2]
                question, answer = question.strip(), answer.strip()
                if task == 19:
                    answer = data.helm_answer(answer, 19)
                out.append(("".join(story_), question, answer))
            else:
                story_.append(fact)
    return out


def test_passages_are_helms_on_every_english_test_file():
    if not (BABI / "en").is_dir():
        pytest.skip(f"{BABI} is absent")
    for task in data.TASK_NAMES:
        path = data.babi_file(BABI, "en", task, "test")
        ours = [(q.passage, q.question, q.answer)
                for q in data.qa_pool(data.load_babi_file(path), task)]
        assert ours == helm_instances(path, task), task


# --------------------------------------------------------------------------- the evaluator
def lm_eval_settings(metric: str = "verbatim") -> EvalConfig:
    return EvalConfig(format="lm_eval", metric=metric, scope="all", max_new_tokens=256,
                      demo_seed=1234, stop=["\n", "Passage:"], progress=False, batch_size=8,
                      cpu_workers=1)


HELM = EvalConfig(format="helm", metric="quasi_exact", scope="all", max_new_tokens=5,
                  n_shots=5, stop=["\n"], progress=False, batch_size=8, cpu_workers=1)


def assert_same_as_one_at_a_time(model, tok, items, settings, ref=None):
    got = evaluate(model, tok, items, settings)
    if ref is None:
        ref = [generate_one_at_a_time(model, tok, it, settings.max_new_tokens, settings.stop)
               for it in items]
    for r, c in zip(got, ref):
        assert r.correct == is_correct(c, r.item.target, settings.metric, settings.stop)
        assert c.startswith(r.continuation)
        if r.decided_by != "forward":
            assert r.continuation == c
    return got, ref


@pytest.mark.slow
def test_helm_per_item_equality_with_one_at_a_time_generate(tiny):
    """The tiny model rarely ends its answer with a newline: most items run to HELM's 5
    tokens, decoded from the pass's cache."""
    model, tok = tiny
    items = data.items_for(DataConfig(n_stories=10, seed=77), HELM)
    assert len(items) == 50
    got, ref = assert_same_as_one_at_a_time(model, tok, items, HELM)
    assert any(r.decided_by == "decode" for r in got)
    assert {r.correct for r in got} == {True, False}
    # HELM's format decodes every continuation whole (results.csv's four HELM columns are
    # read off it), whichever metric decides: the same outcomes as the metric alone
    for metric in ("contains", *HELM_METRICS.values()):
        ev = dataclasses.replace(HELM, metric=metric)
        res = evaluate(model, tok, items, ev)
        assert [r.continuation for r in res] == [cut_at_stop(c, HELM.stop) for c in ref]
        assert [r.correct for r in res] == [is_correct(c, it.target, metric, HELM.stop)
                                            for c, it in zip(ref, items)]
        name = next((k for k, v in HELM_METRICS.items() if v == metric), None)
        if name:
            assert [r.correct for r in res] == [helm_scores(r.continuation, r.item.answer)[name]
                                                for r in res]


@pytest.mark.slow
def test_lm_eval_per_item_equality_with_one_at_a_time_generate(tiny):
    """One reference run (up to the harness's 256 tokens, ended by its stop strings), scored
    by lm-eval's metric and by two others on the same prompts and stops."""
    model, tok = tiny
    items = data.items_for(DataConfig(n_stories=10, seed=78), lm_eval_settings())
    assert len(items) == 50
    got, ref = assert_same_as_one_at_a_time(model, tok, items, lm_eval_settings())
    # its decoder writes no space before the first generated word: nothing scores
    assert tok.decode(tok(" kitchen", add_special_tokens=False)["input_ids"]) == "kitchen"
    assert not any(r.correct for r in got)
    got, _ = assert_same_as_one_at_a_time(model, tok, items, lm_eval_settings("contains"), ref)
    assert sum(r.correct for r in got) >= 25  # the tiny model knows most answers
    got, _ = assert_same_as_one_at_a_time(model, tok, items, lm_eval_settings("quasi_exact"),
                                          ref)
    decoded = [r for r in got if r.decided_by == "decode"]
    assert decoded and any(len(tok(r.continuation)["input_ids"]) < 100 for r in decoded)


def test_five_shot_prompts_fit_and_too_many_shots_are_refused(tiny):
    model, tok = tiny
    check_prompt_lengths(model, tok, data.items_for(DataConfig(n_stories=20), HELM), 5)
    long = EvalConfig(format="helm", scope="all", n_shots=60)
    with pytest.raises(PromptTooLong, match="the model takes 1024 positions"):
        check_prompt_lengths(model, tok, data.items_for(DataConfig(n_stories=2), long), 5)


def test_n_shots_needs_a_demo_format():
    from ih_sweep.config.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.n_shots=2 is not allowed; eval.format=notebook"):
        settings(compose("eval.n_shots=2"))
    config = settings(compose("eval=helm"))
    assert (config.eval.format, config.eval.metric, config.eval.n_shots,
            config.eval.max_new_tokens, config.eval.stop) == ("helm", "quasi_exact", 5, 5,
                                                              ["\n"])


@pytest.mark.slow
def test_cli_eval_helm_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ih_sweep", "eval=helm", "debug=fast", "n_heads=0",
         "condition=none", "data.n_stories=6", f"hydra.run.dir={tmp_path}",
         f"paths.cache_dir={tmp_path / 'cache'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "job.json").read_text())
    assert record["eval"]["format"] == "helm" and record["eval"]["n_shots"] == 5
    assert record["eval"]["demo_pool"] == "generated: 200 stories of seed 1000000"
    results = pd.read_csv(tmp_path / "results.csv", keep_default_na=False)
    assert len(results) == 30 and set(results["metric"]) == {"quasi_exact"}
    assert record["n_correct"] == int(results["correct"].sum())
    assert not results["continuation"].str.contains("\n").any()  # cut at the stop string
    # HELM's four metrics, each as HELM defines it, quasi_exact_match the deciding one
    for name in HELM_METRICS:
        assert [str(v) for v in results[name]] == [
            str(helm_scores(c, a)[name]) for c, a in zip(results["continuation"],
                                                         results["answer"])]
    assert list(results["quasi_exact_match"]) == list(results["correct"])


# --------------------------------------------------------------------------- demo pool
def release(root: Path, *langs: str) -> Path:
    """A release folder holding qa1 train and test files (the test fixture's stories) in
    each of ``langs``."""
    text = (ROOT / "tests" / "fixtures" / "qa1_tiny.txt").read_text()
    for lang in langs:
        (root / lang).mkdir(parents=True)
        for split in ("train", "test"):
            (root / lang / f"qa1_single-supporting-fact_{split}.txt").write_text(text)
    return root


@pytest.mark.parametrize("langs, asked, fmt, want", [
    (("en", "en-10k"), "en-10k", "helm", "en"),  # the 1k file: HELM's pool is 90% of it
    (("en", "en-10k", "en-valid"), "en-10k", "helm", "en-valid"),  # HELM's own pool
    (("en-10k",), "en-10k", "helm", "en-10k"),  # no en/: the evaluated language's
    (("en", "en-10k"), "en-10k", "lm_eval", "en-10k"),  # lm-eval's pool is not HELM's
    (("en", "hn"), "hn", "helm", "hn"),  # Hindi demos for Hindi questions
])
def test_helms_demo_pool_is_the_1k_english_train_file_where_present(tmp_path, langs, asked,
                                                                   fmt, want):
    root = release(tmp_path, *langs)
    dc = DataConfig(name="babi_files", path=str(root), lang=asked, split="test")
    ev = EvalConfig(format=fmt, scope="all", n_shots=1)
    assert data.demo_lang(dc, ev) == want
    assert data.demo_source(dc, ev) == f"babi_files: {want} qa1 train"
    _, where = data.demo_stories(dc, ev)
    assert where.startswith(str(root / want / "qa1_single-supporting-fact_train.txt"))
    # eval.demo_lang names the folder itself
    ev.demo_lang = asked
    assert data.demo_lang(dc, ev) == asked
    assert data.demo_source(dc, dataclasses.replace(ev, n_shots=0)) is None


def test_demo_lang_must_be_a_release_folder():
    from ih_sweep.config.errors import ConfigError

    with pytest.raises(ConfigError, match="^eval.demo_lang='fr' is not allowed; allowed: null "):
        settings(compose("eval=helm", "eval.demo_lang=fr"))

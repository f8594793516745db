"""The items a job evaluates: each question of a story as a prompt in the notebook's format
(its few-shot prompt, byte for byte), HELM's ``babi_qa`` or lm-evaluation-harness's ``babi``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from ih_sweep.config.schema import DataConfig, DataSource, EvalConfig, PromptFormat, Scope, Split
from ih_sweep.data.sources import (
    HUB_DATASET,
    DataError,
    Story,
    babi_file,
    generate_stories,
    load_babi_file,
    load_babi_hub,
    load_stories,
)

log = logging.getLogger(__name__)

PROMPT_HEADER = "Read the following passage and answer the questions with a single word.\n\n"


def question_indices(story: Story) -> list[int]:
    return [i for i, t in enumerate(story["type"]) if t == 1]


def build_prompt(story: Story, question: int | None = None, header: str = PROMPT_HEADER) -> str:
    """The notebook's few-shot prompt asking the question at line index ``question``.

    Blocks come from the line types (not a fixed length) so tasks of any shape work; earlier
    questions appear with their answers, the asked one ends with ``"Answer: "``. With the
    default (last question) this reproduces the notebook's ``create_prompt`` byte for byte.
    """
    if question is None:
        question = question_indices(story)[-1]
    if story["type"][question] != 1:
        raise ValueError(f"line {question} of the story is not a question")
    prompt = header
    in_passage = False
    for i in range(question + 1):
        text = story["text"][i]
        if story["type"][i] == 0:
            if not in_passage:
                prompt += "Passage: "
                in_passage = True
            prompt += f"{text}\n"
        else:
            prompt += f"\nQuestion: {text}\nAnswer: "
            if i != question:
                prompt += f"{story['answer'][i]}\n"
            in_passage = False
    return prompt


@dataclass(frozen=True)
class Item:
    """One question to evaluate: its prompt, gold answer and place in the story."""

    story_index: int
    question_index: int  # 0-based among the story's questions
    line: int  # index into the story's lists
    examples_before: int  # answered questions shown before it in the prompt
    prompt: str
    answer: str
    lead: str = ""  # what the format puts between the prompt and the answer (helm: " ")

    @property
    def target(self) -> str:
        """The gold continuation as the format expects it after the prompt."""
        return self.lead + self.answer


def make_items(stories: list[Story], scope: str = "last",
               header: str = PROMPT_HEADER) -> list[Item]:
    """Items for ``scope='last'`` (each story's final question, the notebook's) or ``'all'``."""
    if scope not in list(Scope):
        raise ValueError(f"eval.scope={scope!r}; allowed values: last, all")
    items: list[Item] = []
    for s_idx, story in enumerate(stories):
        qs = question_indices(story)
        chosen = list(enumerate(qs)) if scope == "all" else [(len(qs) - 1, qs[-1])]
        for q_idx, line in chosen:
            items.append(Item(s_idx, q_idx, line, q_idx, build_prompt(story, line, header),
                              story["answer"][line]))
    return items


# --------------------------------------------------------------------------- HELM, lm-eval
# Sources read (cite these commits when comparing numbers):
#   HELM: stanford-crfm/helm 63754d05db6f874e41a395880fb573890a13e791 (2026-06-05):
#     src/helm/benchmark/scenarios/babi_qa_scenario.py (instances, task-19 answers),
#     run_specs/classic_run_specs.py get_babi_qa_spec -> adaptation/common_adapter_specs.py
#     get_generation_adapter_spec(input_noun="Passage", output_noun="Answer") (prefixes,
#     5 demos, 5 tokens, stop "\n", temperature 0), adaptation/prompt.py (blocks joined by
#     instance_prefix "\n"), adaptation/adapters/in_context_learning_adapter.py
#     (construct_example_prompt, sample_examples).
#   lm-eval: EleutherAI/lm-evaluation-harness 4e7e0d47f33bc71070c1d38394bafbb52b117163
#     (2026-08-21): lm_eval/tasks/babi/babi.yaml (unchanged since ff739414, 2024-01-11),
#     lm_eval/api/task.py fewshot_context/build_qa_turn (target_delimiter "",
#     fewshot_delimiter "\n\n"), lm_eval/api/samplers.py ContextSampler.sample
#     (random.Random(1234).sample per question), lm_eval/models/huggingface.py (256 tokens).
HELM_DIRECTIONS = {"s": "south", "n": "north", "e": "east", "w": "west"}
DEMO_SEED_OFFSET = 1_000_000  # generator: the demo pool's seed is data.seed + this
DEMO_POOL_STORIES = 200  # generator: stories in the demo pool (as many as en/ train holds)


@dataclass(frozen=True)
class QA:
    """One question as HELM's scenario makes an instance of it: the story's statements
    before it (each ending in a newline; earlier questions left out), the question, the
    answer (task 19's paths in words)."""

    passage: str
    question: str
    answer: str


def helm_answer(answer: str, task: int) -> str:
    """HELM's answer text: task 19's ``s,w`` becomes ``south west``
    (``BabiQAScenario.process_path``); other tasks' answers unchanged."""
    if task != 19:
        return answer
    return " ".join(HELM_DIRECTIONS[step] for step in answer.split(","))


def qa_of(story: Story, line: int, task: int) -> QA:
    """The :class:`QA` of the question at ``line`` (HELM's ``get_instances``)."""
    passage = "".join(f"{story['text'][i]}\n" for i in range(line) if story["type"][i] == 0)
    return QA(passage, story["text"][line].strip(),
              helm_answer(story["answer"][line].strip(), task))


def qa_pool(stories: Iterable[Story], task: int) -> list[QA]:
    """Every question of ``stories`` in file order: HELM's train instances, lm-eval's
    few-shot documents."""
    return [qa_of(st, line, task) for st in stories for line in question_indices(st)]


def qa_block(qa: QA, answered: bool) -> str:
    """``Passage: <passage>Question: <question>\nAnswer:``, and `` <answer>\n`` for a demo:
    HELM's ``construct_example_prompt`` with input prefix ``Passage: ``, input suffix ``\n``,
    output prefix ``Answer: `` (right-stripped when the answer is left out) and output
    suffix ``\n``; lm-eval's ``doc_to_text`` (+ ``doc_to_target`` `` <answer>``)."""
    block = f"Passage: {qa.passage}Question: {qa.question}\nAnswer:"
    return block + f" {qa.answer}\n" if answered else block


def qa_prompt(demos: Sequence[QA], qa: QA) -> str:
    """The demos' blocks, then the asked one, joined by ``\n``: HELM's ``Prompt.text``
    (instance_prefix ``\n``, no instructions). lm-eval's few-shot context writes each demo as
    its text, its target and ``\n\n``: the same string."""
    return "\n".join([qa_block(d, True) for d in demos] + [qa_block(qa, False)])


def helm_demos(pool: Sequence[QA], n: int, seed: int = 0) -> list[QA]:
    """HELM's ``InContextLearningAdapter.sample_examples`` (sample_train=True): answers
    ordered by how many pool questions have them (most first; ties in sorted order, then
    shuffled), cycled, one question drawn without replacement per answer, until ``n``.
    HELM seeds Python's global ``random`` with the train trial index (0); the same draws
    come from ``random.Random(seed)``. Chosen once: every question of a run gets these."""
    rng = random.Random(seed)
    k = min(len(pool), n)
    by_label: dict[str, list[QA]] = {}
    for qa in pool:
        by_label.setdefault(qa.answer, []).append(qa)
    counts: dict[int, list[str]] = {}
    for label, members in sorted(by_label.items()):
        counts.setdefault(len(members), []).append(label)
    order: list[str] = []
    for count in sorted(counts, reverse=True):
        labels = counts[count]
        rng.shuffle(labels)
        order.extend(labels)
    examples: list[QA] = []
    i = 0
    while k > 0 and order:
        members = by_label[order[i % len(order)]]
        i += 1
        if not members:
            continue
        examples.append(members.pop(rng.randrange(len(members))))
        k -= 1
    return examples


def lm_eval_demos(pool: Sequence[QA], n: int, rng: random.Random) -> list[QA]:
    """lm-eval's ``ContextSampler.sample``: ``rng.sample(pool, n)``, drawn anew for each
    question from one generator seeded once (``--fewshot_random_seed``, 1234 by default)."""
    return rng.sample(list(pool), n) if n > 0 else []


def make_qa_items(stories: list[Story], scope: str, fmt: str, pool: Sequence[QA],
                  n_shots: int, seed: int, task: int) -> list[Item]:
    """Items in HELM's or lm-eval's format (``fmt``: ``helm`` or ``lm_eval``), each prompt
    ``n_shots`` demos from ``pool`` (see :func:`helm_demos`, :func:`lm_eval_demos`) and the
    asked question's block; the target is `` <answer>`` (HELM's output prefix ends in a
    space that the asked block drops; lm-eval's target begins with one). Both evaluate every
    question (``scope='all'``); ``last`` keeps each story's final one."""
    if scope not in list(Scope):
        raise ValueError(f"eval.scope={scope!r}; allowed values: last, all")
    if fmt not in (PromptFormat.helm, PromptFormat.lm_eval):
        raise ValueError(f"eval.format={fmt!r}: make_qa_items builds helm and lm_eval")
    if n_shots > len(pool):
        raise DataError(f"eval.n_shots={n_shots}, but the demo pool holds {len(pool)} "
                        "questions; allowed: at most that many")
    fixed = helm_demos(pool, n_shots, seed) if fmt == PromptFormat.helm else None
    rng = random.Random(seed)
    items: list[Item] = []
    for s_idx, story in enumerate(stories):
        qs = question_indices(story)
        chosen = list(enumerate(qs)) if scope == "all" else [(len(qs) - 1, qs[-1])]
        for q_idx, line in chosen:
            qa = qa_of(story, line, task)
            demos = fixed if fixed is not None else lm_eval_demos(pool, n_shots, rng)
            items.append(Item(s_idx, q_idx, line, len(demos), qa_prompt(demos, qa), qa.answer,
                              lead=" "))
    return items


# HELM draws its demos from en-valid's train file (babi_qa_scenario.py); the en (1k) train file
# holds it (en-valid train is 90% of en train): the stand-ins for it, closest first
HELM_POOL_LANGS = ("en-valid", "en")
ENGLISH_LANGS = ("en", "en-10k", "en-valid", "en-valid-10k")


def demo_lang(data: DataConfig, ev: EvalConfig) -> str:
    """The release folder (a :data:`~ih_sweep.config.schema.LANGS` name) whose train file of
    task ``data.task`` gives the demos, with ``data=babi_files`` or ``babi_hub``.

    ``ev.demo_lang`` when set. Else (null), for ``eval.format=helm`` with English files
    (``data.lang`` one of :data:`ENGLISH_LANGS`) and ``data=babi_files``: the first of
    :data:`HELM_POOL_LANGS` whose train file the folder ``data.path`` holds (en-valid's is
    HELM's own pool, en's the closest stand-in: HELM's is 90% of it, while en-10k's train
    holds other stories); otherwise ``data.lang`` itself."""
    if ev.demo_lang:
        return ev.demo_lang
    if ev.format == PromptFormat.helm and data.name == DataSource.babi_files \
            and data.lang in ENGLISH_LANGS and data.path:
        for lang in HELM_POOL_LANGS:
            try:
                babi_file(data.path, lang, data.task, "train")
            except DataError:
                continue
            return lang
    return data.lang


def demo_source(data: DataConfig, ev: EvalConfig) -> str | None:
    """Where a job's demos come from, in a few words (job.json's ``eval.demo_pool``): the
    train file's ``<lang>/`` folder and task, the hub's, or the generator's seed; None for a
    prompt without demos (``eval.format=notebook`` or ``eval.n_shots=0``)."""
    if ev.format == PromptFormat.notebook or not ev.n_shots:
        return None
    if data.name == DataSource.babi_generated:
        return f"generated: {DEMO_POOL_STORIES} stories of seed {data.seed + DEMO_SEED_OFFSET}"
    where = "babi_files" if data.name == DataSource.babi_files else "babi_hub"
    return f"{where}: {demo_lang(data, ev)} qa{data.task} train"


def demo_stories(data: DataConfig, ev: EvalConfig | None = None) -> tuple[list[Story], str]:
    """Stories whose questions make the demo pool, and where they come from in words.

    HELM and lm-eval draw demos from the task's train split (HELM: ``en-valid`` train, 90%
    of the release's ``en`` train stories; lm-eval: ``Muennighoff/babi`` train, every task
    together). Here: with ``data=babi_files``/``babi_hub``, every story of the train file of
    :func:`demo_lang` (``data.lang`` unless ``eval.demo_lang`` says otherwise, or HELM's
    format finds ``en-valid``/``en`` beside the files; a stand-in unless it is
    ``en-valid``: which 90% HELM keeps is known only from that folder, and lm-eval's pool
    mixes tasks) and the same task; with the built-in generator, :data:`DEMO_POOL_STORIES`
    generated stories of seed ``data.seed`` + :data:`DEMO_SEED_OFFSET` (a stand-in).
    ``ev``: the eval settings (None: the defaults, demos from ``data.lang``)."""
    if data.name == DataSource.babi_generated:
        seed = data.seed + DEMO_SEED_OFFSET
        return (generate_stories(DEMO_POOL_STORIES, seed, data.task),
                f"{DEMO_POOL_STORIES} generated stories of seed {seed} (a stand-in for train)")
    lang = demo_lang(data, ev) if ev is not None else data.lang
    if data.split == Split.train and lang == data.lang:
        log.warning("data.split=train: the demos come from the evaluated file itself (HELM "
                    "and lm-eval report the test split: data.split=test)")
    if data.name == DataSource.babi_files:
        path = babi_file(data.path or "", lang, data.task, "train")
        stand_in = "HELM's own pool" if lang == "en-valid" and ev is not None \
            and ev.format == PromptFormat.helm else "a stand-in for the original's train split"
        return load_babi_file(path), f"{path} ({stand_in})"
    return (load_babi_hub(lang, data.task, "train"),
            f"{HUB_DATASET} {lang} qa{data.task} train (a stand-in for the original's)")


def items_for(data: DataConfig, ev: EvalConfig, stories: list[Story] | None = None
              ) -> list[Item]:
    """The items of a job: ``data``'s stories (``stories`` when given, already loaded) in
    ``ev.format`` (the notebook's prompt, or HELM's / lm-eval's with ``ev.n_shots`` demos,
    see :func:`demo_stories`)."""
    if stories is None:
        stories = load_stories(data)
    if ev.format == PromptFormat.notebook:
        return make_items(stories, ev.scope)
    pool: list[QA] = []
    if ev.n_shots:
        demo, where = demo_stories(data, ev)
        pool = qa_pool(demo, data.task)
        log.info("eval.format=%s: %d demos per prompt from %d questions of %s", ev.format,
                 ev.n_shots, len(pool), where)
    return make_qa_items(stories, ev.scope, ev.format, pool, ev.n_shots, ev.demo_seed,
                         data.task)


def iter_lm_text(stories: Iterable[Story]) -> Iterator[str]:
    """Full prompts with every answer filled in (training text for the tiny model)."""
    for story in stories:
        last = question_indices(story)[-1]
        yield build_prompt(story, last) + story["answer"][last] + "\n"

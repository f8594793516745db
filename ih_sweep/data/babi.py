"""bAbI stories: one representation, a seeded generator, loaders and the notebook's prompt.

Every story is a dict of parallel lists in the schema of the Hugging Face
``facebook/babi_qa`` records, so generated, file and hub data flow through the same code:
``id`` (str), ``type`` (0 = context line, 1 = question), ``text``, ``supporting_ids``
(list of str) and ``answer`` ("" on context lines).
"""

from __future__ import annotations

import logging
import random
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from ih_sweep.config.errors import UserError, one_line
from ih_sweep.config.schema import DataConfig, DataSource, EvalConfig, PromptFormat, Scope, Split

log = logging.getLogger(__name__)


class Story(TypedDict):
    id: list[str]
    type: list[int]
    text: list[str]
    supporting_ids: list[list[str]]
    answer: list[str]


class DataError(UserError):
    """A bAbI file or folder that cannot be read as bAbI."""

    kind = "data"


ACTORS = ("Mary", "John", "Sandra", "Daniel")
LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
MOVE_PHRASES = ("moved to", "went to", "went back to", "journeyed to", "travelled to")
TASK_NAMES = {
    1: "single-supporting-fact",
    2: "two-supporting-facts",
    3: "three-supporting-facts",
    4: "two-arg-relations",
    5: "three-arg-relations",
    6: "yes-no-questions",
    7: "counting",
    8: "lists-sets",
    9: "simple-negation",
    10: "indefinite-knowledge",
    11: "basic-coreference",
    12: "conjunction",
    13: "compound-coreference",
    14: "time-reasoning",
    15: "basic-deduction",
    16: "basic-induction",
    17: "positional-reasoning",
    18: "size-reasoning",
    19: "path-finding",
    20: "agents-motivations",
}
PROMPT_HEADER = "Read the following passage and answer the questions with a single word.\n\n"


# --------------------------------------------------------------------------- generator
def generate_qa1_story(rng: random.Random, n_blocks: int = 5, statements_per_block: int = 2,
                       question_window: int = 5, uniform_actor: bool = False) -> Story:
    """One bAbI task-1 story drawn the way the released en-10k files were.

    Each statement moves a uniform actor to a uniform room other than its current one; each
    question asks about the actor of a uniform statement among the last ``question_window``.
    ``uniform_actor=True`` instead asks about a uniform actor among those mentioned so far, so
    the supporting fact lies further back more often (training data for the tiny model).
    """
    story: Story = {"id": [], "type": [], "text": [], "supporting_ids": [], "answer": []}
    where: dict[str, tuple[str, int]] = {}  # actor -> (room, line id of that move)
    statement_lines: list[tuple[str, int]] = []  # (actor, line id)
    line = 0
    for _ in range(n_blocks):
        for _ in range(statements_per_block):
            line += 1
            actor = rng.choice(ACTORS)
            current = where.get(actor, (None, 0))[0]
            room = rng.choice([loc for loc in LOCATIONS if loc != current])
            phrase = rng.choice(MOVE_PHRASES)
            where[actor] = (room, line)
            statement_lines.append((actor, line))
            _append(story, line, 0, f"{actor} {phrase} the {room}.", [], "")
        line += 1
        if uniform_actor:
            actor = rng.choice(sorted(where))
        else:
            actor, _ = rng.choice(statement_lines[-question_window:])
        room, support = where[actor]
        _append(story, line, 1, f"Where is {actor}?", [str(support)], room)
    return story


def generate_stories(n_stories: int, seed: int = 0, task: int = 1) -> list[Story]:
    """Deterministic list of generated stories (only task 1 has a generator)."""
    if task != 1:
        raise DataError(f"data.task={task}: the built-in generator makes task 1 only; "
                        "use data=babi_files or data=babi_hub for other tasks")
    rng = random.Random(seed)
    return [generate_qa1_story(rng) for _ in range(n_stories)]


def _append(story: Story, line_id: int, kind: int, text: str, support: list[str],
            answer: str) -> None:
    story["id"].append(str(line_id))
    story["type"].append(kind)
    story["text"].append(text)
    story["supporting_ids"].append(support)
    story["answer"].append(answer)


# --------------------------------------------------------------------------- text files
_LINE = re.compile(r"^(\d+) (.*)$")


def parse_babi_lines(lines: Iterable[str], source: str = "<input>") -> list[Story]:
    """Parse the original release format (``ID text`` / ``ID question\tanswer\tsupport``),
    as files are saved by other editors and platforms too: a byte-order mark, Windows or old
    Mac line endings, spaces around fields and blank lines are accepted. Raises
    :class:`DataError` naming ``source:line`` for anything else, and for a story without a
    question or a file without a story."""
    stories: list[Story] = []
    story: Story | None = None
    starts: list[int] = []
    lineno = 0
    for lineno, raw in enumerate(lines, start=1):
        line = raw.lstrip("\ufeff") if lineno == 1 else raw
        line = line.rstrip("\r\n").strip(" ")
        if not line.strip():
            continue
        m = _LINE.match(line)
        if m is None:
            raise DataError(f"{source}:{lineno}: expected 'ID text' (a line number, a space, "
                            f"the text), got {line[:60]!r}")
        line_id, rest = m.group(1), m.group(2)
        if line_id == "1" or story is None:
            if line_id != "1":
                raise DataError(f"{source}:{lineno}: a story must start at id 1, got {line_id}")
            story = {"id": [], "type": [], "text": [], "supporting_ids": [], "answer": []}
            stories.append(story)
            starts.append(lineno)
        if "\t" in rest:
            parts = [p.strip() for p in rest.split("\t")]
            if len(parts) != 3 or not parts[0] or not parts[1]:
                raise DataError(f"{source}:{lineno}: a question line needs "
                                f"'question<TAB>answer<TAB>supporting ids', got {line[:60]!r}")
            question, answer, support = parts
            _append(story, int(line_id), 1, question, support.split(), answer)
        else:
            _append(story, int(line_id), 0, rest.strip(), [], "")
    if not stories:
        raise DataError(f"{source}: no story in it ({lineno} lines); a bAbI file holds lines "
                        "'1 text', '2 text', ..., 'N question<TAB>answer<TAB>ids'")
    for start, st in zip(starts, stories):
        if 1 not in st["type"]:
            raise DataError(f"{source}:{start}: the story starting here has no question "
                            "(a line 'ID question<TAB>answer<TAB>supporting ids')")
    return stories


def babi_file(root: str | Path, lang: str, task: int, split: str) -> Path:
    """Path of one task file in an extracted v1.2 release: ``root/lang/qaN_name_split.txt``,
    or ``root/lang/qaN_split.txt`` as the ``en-valid`` folders name them."""
    _check_task_split(task, split)
    folder = Path(root) / lang
    names = [f"qa{task}_{TASK_NAMES[task]}_{split}.txt", f"qa{task}_{split}.txt"]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    if not folder.is_dir():
        there = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) \
            if Path(root).is_dir() else []
        raise DataError(f"data.path={root}: no folder {lang}/ in it (data.lang={lang}); "
                        + (f"it holds {', '.join(there)}" if there else "it is empty or missing")
                        + "; give the folder of the extracted release (tasks_1-20_v1-2)")
    raise DataError(f"{folder}: no {' or '.join(names)} (data.task={task}, data.split={split})")


def load_babi_file(path: str | Path) -> list[Story]:
    """The stories of one task file (UTF-8, with or without a byte-order mark)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); a bAbI task file is "
                        "plain text") from None
    if "\x00" in text:
        raise DataError(f"{path}: holds NUL bytes; a bAbI task file is plain text")
    return parse_babi_lines(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"),
                            source=str(path))


def load_babi_archive(archive: str | Path, lang: str, task: int, split: str) -> list[Story]:
    """Read one task straight from the release tarball (``tasks_1-20_v1-2.tar.gz``)."""
    _check_task_split(task, split)
    name = f"qa{task}_{TASK_NAMES[task]}_{split}.txt"
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if len(parts) >= 2 and parts[-1] == name and parts[-2] == lang:
                fh = tar.extractfile(member)
                assert fh is not None
                text = fh.read().decode("utf-8").splitlines()
                return parse_babi_lines(text, source=f"{archive}:{member.name}")
    raise DataError(f"{archive}: no {lang}/{name} in the archive")


def _check_task_split(task: int, split: str) -> None:
    if task not in TASK_NAMES:
        raise DataError(f"data.task={task} is unknown; allowed values: 1..20")
    if split not in ("train", "valid", "test"):
        raise DataError(f"data.split={split!r} is unknown; allowed values: train, valid, test")


# --------------------------------------------------------------------------- the hub
HUB_DATASET = "facebook/babi_qa"
HUB_ARCHIVE = "data/tasks_1-20_v1-2.tar.gz"


def stories_from_hub_records(records: Iterable[dict[str, Any]]) -> list[Story]:
    """Convert rows of the hub dataset (each ``{"story": {...}}``) into stories."""
    out: list[Story] = []
    for row in records:
        s = row["story"] if "story" in row else row
        out.append({
            "id": [str(x) for x in s["id"]],
            "type": [int(x) for x in s["type"]],
            "text": [str(t).strip() for t in s["text"]],
            "supporting_ids": [[str(x) for x in ids] for ids in s["supporting_ids"]],
            "answer": [str(a) for a in s["answer"]],
        })
    return out


def load_babi_hub(lang: str, task: int, split: str) -> list[Story]:  # pragma: no cover - network
    """Load from the Hugging Face hub (needs network).

    ``load_dataset("facebook/babi_qa", "en-10k-qa1")`` fails with datasets >= 4 because loading
    scripts were removed; the qa1 configs have a parquet export, and every task is in the
    release archive stored in the same dataset repository.
    """
    _check_task_split(task, split)
    try:
        return _from_hub(lang, task, split)
    except DataError:
        raise
    except Exception as err:  # the hub client's many network and format errors
        first = one_line(err, 160)
        raise DataError(f"data=babi_hub: {HUB_DATASET} could not be loaded "
                        f"({type(err).__name__}: {first}); without network use the release "
                        "files: data=babi_files data.path=<folder holding en/, en-10k/>"
                        ) from None


def _from_hub(lang: str, task: int, split: str) -> list[Story]:  # pragma: no cover - network
    from huggingface_hub import constants

    from ih_sweep.model.loading import hub_reachable

    if constants.HF_HUB_OFFLINE or not hub_reachable():
        raise DataError("data=babi_hub: the Hugging Face hub does not answer from here "
                        "(or HF_HUB_OFFLINE is set); use the release files: data=babi_files "
                        "data.path=<folder holding en/, en-10k/>")
    if task == 1:
        from datasets import load_dataset

        ds = load_dataset(HUB_DATASET, data_dir=f"{lang}-qa1", revision="refs/convert/parquet",
                          split=split)
        return stories_from_hub_records(ds)
    from huggingface_hub import hf_hub_download

    archive = hf_hub_download(HUB_DATASET, HUB_ARCHIVE, repo_type="dataset")
    return load_babi_archive(archive, lang, task, split)


# --------------------------------------------------------------------------- prompts
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


def demo_stories(data: DataConfig) -> tuple[list[Story], str]:
    """Stories whose questions make the demo pool, and where they come from in words.

    HELM and lm-eval draw demos from the task's train split (HELM: ``en-valid`` train, 90%
    of the release's train stories; lm-eval: ``Muennighoff/babi`` train, every task
    together). Here: with ``data=babi_files``/``babi_hub``, every story of the train file of
    the same language and task (a stand-in: which 90% HELM keeps is not known here, and
    lm-eval's pool mixes tasks); with the built-in generator, :data:`DEMO_POOL_STORIES`
    generated stories of seed ``data.seed`` + :data:`DEMO_SEED_OFFSET` (a stand-in)."""
    if data.name == DataSource.babi_generated:
        seed = data.seed + DEMO_SEED_OFFSET
        return (generate_stories(DEMO_POOL_STORIES, seed, data.task),
                f"{DEMO_POOL_STORIES} generated stories of seed {seed} (a stand-in for train)")
    if data.split == Split.train:
        log.warning("data.split=train: the demos come from the evaluated file itself (HELM "
                    "and lm-eval report the test split: data.split=test)")
    if data.name == DataSource.babi_files:
        path = babi_file(data.path or "", data.lang, data.task, "train")
        return load_babi_file(path), f"{path} (a stand-in for the original's train split)"
    return (load_babi_hub(data.lang, data.task, "train"),
            f"{HUB_DATASET} {data.lang} qa{data.task} train (a stand-in for the original's)")


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
        demo, where = demo_stories(data)
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


def load_stories(data: DataConfig) -> list[Story]:
    """Stories for a ``data`` config (babi_generated, babi_files or babi_hub), the first
    ``data.n_stories`` of them (all when null)."""
    n = data.n_stories
    if data.name == DataSource.babi_generated:
        return generate_stories(int(n or 1000), data.seed, data.task)
    if data.name == DataSource.babi_files:
        if not data.path:
            raise DataError("data.path is empty; give the folder of the bAbI release "
                            "(the one holding en/, en-10k/, ...)")
        stories = load_babi_file(babi_file(data.path, data.lang, data.task, data.split))
    else:
        stories = load_babi_hub(data.lang, data.task, data.split)
    if n and n > len(stories):
        log.warning("data.n_stories=%d, but the file holds %d stories: evaluating all %d", n,
                    len(stories), len(stories))
    return stories[:n] if n else stories

"""bAbI stories: one representation, and where they come from (a seeded generator of task 1,
the released text files and archive, the Hugging Face hub).

Every story is a dict of parallel lists in the schema of the Hugging Face
``facebook/babi_qa`` records, so generated, file and hub data flow through the same code:
``id`` (str), ``type`` (0 = context line, 1 = question), ``text``, ``supporting_ids``
(list of str) and ``answer`` ("" on context lines). The prompts built from them are
:mod:`ih_sweep.data.prompts`.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypedDict

from ih_sweep.config.errors import UserError, one_line
from ih_sweep.config.schema import DataConfig, DataSource
from ih_sweep.data.files import unreadable

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
            append_line(story, line, 0, f"{actor} {phrase} the {room}.", [], "")
        line += 1
        if uniform_actor:
            actor = rng.choice(sorted(where))
        else:
            actor, _ = rng.choice(statement_lines[-question_window:])
        room, support = where[actor]
        append_line(story, line, 1, f"Where is {actor}?", [str(support)], room)
    return story


def generate_stories(n_stories: int, seed: int = 0, task: int = 1) -> list[Story]:
    """Deterministic list of generated stories (only task 1 has a generator)."""
    if task != 1:
        raise DataError(f"data.task={task}: the built-in generator makes task 1 only; "
                        "use data=babi_files or data=babi_hub for other tasks")
    rng = random.Random(seed)
    return [generate_qa1_story(rng) for _ in range(n_stories)]


def append_line(story: Story, line_id: int, kind: int, text: str, support: list[str],
                answer: str) -> None:
    """Add one line to ``story`` in place: its id, ``kind`` (0 = context line, 1 =
    question), text, supporting line ids and answer ("" on a context line)."""
    story["id"].append(str(line_id))
    story["type"].append(kind)
    story["text"].append(text)
    story["supporting_ids"].append(support)
    story["answer"].append(answer)


# --------------------------------------------------------------------------- text files
_LINE = re.compile(r"^([0-9]+) (.*)$")
SUPPORT_HELP = ("the third field of a question lists the ids of the story's earlier "
                "statements that answer it, separated by spaces (e.g. '3 7')")


def _support(ids: list[str], seen: dict[str, tuple[int, int]], source: str, lineno: int
             ) -> list[str]:
    """The supporting ids of the question at ``source:lineno`` (as the story's ids: no
    leading zeros), each checked to name an earlier statement of its story; ``seen``: id ->
    (type, line number) of the story's lines so far. Raises :class:`DataError` naming the
    file, the line, the id and why."""
    out = []
    for s in ids:
        where = f"{source}:{lineno}: supporting id {s!r}"
        if not (s.isascii() and s.isdigit()):
            raise DataError(f"{where} is not a line id (a number); {SUPPORT_HELP}")
        key = str(int(s))
        if key not in seen:
            before = f"its earlier lines have ids 1 to {max(map(int, seen))}" if seen \
                else "the question is its first line"
            raise DataError(f"{where} names no earlier line of this story ({before}); "
                            f"{SUPPORT_HELP}")
        if seen[key][0] == 1:
            raise DataError(f"{where} names a question (line {seen[key][1]}), not a "
                            f"statement; {SUPPORT_HELP}")
        out.append(key)
    return out


def parse_babi_lines(lines: Iterable[str], source: str = "<input>") -> list[Story]:
    """Parse the original release format (``ID text`` / ``ID question\tanswer\tsupport``),
    as files are saved by other editors and platforms too: a byte-order mark, Windows or old
    Mac line endings, spaces around fields and blank lines are accepted. Raises
    :class:`DataError` naming ``source:line`` for anything else: a line that is not ``ID
    text``, a story that does not start at id 1 or whose ids do not count up, a question
    line without its three fields, a supporting id that is not the id of an earlier
    statement of the story (:func:`_support`), a story without a question, a file without
    a story."""
    stories: list[Story] = []
    story: Story | None = None
    starts: list[int] = []
    seen: dict[str, tuple[int, int]] = {}  # the story's ids so far -> (type, line number)
    last = 0
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
            seen, last = {}, 0
        elif int(line_id) <= last:
            raise DataError(f"{source}:{lineno}: id {line_id} after id {last}; the ids of a "
                            "story count up (1, 2, 3, ...) and a new story starts at 1")
        last = int(line_id)
        if "\t" in rest:
            parts = [p.strip() for p in rest.split("\t")]
            if len(parts) != 3 or not parts[0] or not parts[1]:
                raise DataError(f"{source}:{lineno}: a question line needs "
                                f"'question<TAB>answer<TAB>supporting ids', got {line[:60]!r}")
            question, answer, support = parts
            append_line(story, last, 1, question, _support(support.split(), seen, source,
                                                          lineno), answer)
        else:
            append_line(story, last, 0, rest.strip(), [], "")
        seen[str(last)] = (story["type"][-1], lineno)
    if not stories:
        raise DataError(f"{source}: no story in it (it is empty or blank); a bAbI file holds "
                        "lines '1 text', '2 text', ..., 'N question<TAB>answer<TAB>ids'")
    for start, st in zip(starts, stories):
        if 1 not in st["type"]:
            tabs = " (were its tabs turned into spaces?)" \
                if any("?" in t for t in st["text"]) else ""
            raise DataError(f"{source}:{start}: the story starting here has no question "
                            f"(a line 'ID question<TAB>answer<TAB>supporting ids'){tabs}")
    return stories


def _release_hint(root: Path) -> str:
    there = sorted(p.name for p in root.iterdir() if p.is_dir()) \
        if unreadable(root, "folder") is None else []
    return (f"it holds {', '.join(there)}" if there else "it is empty or missing") + \
        "; give the folder of the extracted release (tasks_1-20_v1-2)"


def babi_file(root: str | Path, lang: str, task: int, split: str) -> Path:
    """Path of one task file in an extracted v1.2 release: ``root/lang/qaN_name_split.txt``,
    or ``root/lang/qaN_split.txt`` as the ``en-valid`` folders name them (a leading ``~`` is
    the home folder). Raises :class:`DataError` naming ``data.path`` or the file where the
    folder, its ``lang`` folder or the file is missing or cannot be read
    (:func:`ih_sweep.data.files.unreadable`): a file where a folder belongs, a folder or
    named pipe where the file belongs, a loop of symbolic links, a permission refused."""
    _check_task_split(task, split)
    root = Path(root).expanduser()
    problem = unreadable(root, "folder")
    if problem is not None and problem.startswith("no such"):
        raise DataError(f"data.path={root}: no folder {lang}/ in it (data.lang={lang}); "
                        f"{problem}; give the folder of the extracted release "
                        "(tasks_1-20_v1-2)")
    if problem is not None:
        raise DataError(f"data.path={root}: {problem}; give the folder of the extracted "
                        "release (tasks_1-20_v1-2, holding en/, en-10k/, ...)")
    folder = root / lang
    problem = unreadable(folder, "folder")
    if problem is not None and problem.startswith("no such"):
        raise DataError(f"data.path={root}: no folder {lang}/ in it (data.lang={lang}); "
                        + _release_hint(root))
    if problem is not None:
        raise DataError(f"{folder}: {problem} (data.path={root}, data.lang={lang})")
    names = [f"qa{task}_{TASK_NAMES[task]}_{split}.txt", f"qa{task}_{split}.txt"]
    for name in names:
        if os.path.lexists(folder / name):
            problem = unreadable(folder / name)
            if problem is not None:
                raise DataError(f"{folder / name}: {problem} (data.task={task}, "
                                f"data.split={split})")
            return folder / name
    raise DataError(f"{folder}: no {' or '.join(names)} (data.task={task}, data.split={split})")


MAX_BABI_FILE_BYTES = 256 << 20  # the largest task file of the release (en-10k qa19 train) ~2.5 MB


def load_babi_file(path: str | Path) -> list[Story]:
    """The stories of one task file (UTF-8, with or without a byte-order mark; at most
    :data:`MAX_BABI_FILE_BYTES`). Raises :class:`DataError` naming the file for one that
    cannot be read (:func:`ih_sweep.data.files.unreadable`) or parsed
    (:func:`parse_babi_lines`)."""
    path = Path(path)
    problem = unreadable(path)
    if problem is not None:
        raise DataError(f"{path}: {problem}")
    size = path.stat().st_size
    if size > MAX_BABI_FILE_BYTES:
        raise DataError(f"{path}: {size:,} bytes; a bAbI task file is far smaller (at most "
                        f"{MAX_BABI_FILE_BYTES:,} bytes are read)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); a bAbI task file is "
                        "plain text") from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or type(err).__name__})"
                        ) from None
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
HUB_OFFLINE = ("data=babi_hub: the Hugging Face hub does not answer from here (or "
               "HF_HUB_OFFLINE is set); use the release files: data=babi_files "
               "data.path=<folder holding en/, en-10k/>")


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
        raise DataError(HUB_OFFLINE)
    if task == 1:
        from datasets import load_dataset

        ds = load_dataset(HUB_DATASET, data_dir=f"{lang}-qa1", revision="refs/convert/parquet",
                          split=split)
        return stories_from_hub_records(ds)
    from huggingface_hub import hf_hub_download

    archive = hf_hub_download(HUB_DATASET, HUB_ARCHIVE, repo_type="dataset")
    return load_babi_archive(archive, lang, task, split)


_PARSED: dict[tuple[str, int, int], int] = {}  # (file, size, mtime) -> its stories


def check_babi_files(data: DataConfig, demos: bool | str | None = False) -> list[Path]:
    """What a job with ``data=babi_files`` will read, checked before any job runs: a
    non-empty ``data.path``, the task file of ``data.lang``/``data.task``/``data.split``
    (:func:`babi_file`) and, with ``demos`` (a prompt format with demonstrations: True, or
    the LANGS folder they come from, :func:`ih_sweep.data.prompts.demo_lang`), the train file
    they are drawn from (``data.lang``'s for True), each readable and parsed
    (:func:`load_babi_file`; a file parsed before in this process, same size and
    modification time, is not parsed again). Returns the files. Raises :class:`DataError`
    naming the key or file."""
    if data.name != DataSource.babi_files:
        return []
    if not data.path:
        raise DataError("data.path is empty; give the folder of the bAbI release "
                        "(the one holding en/, en-10k/, ...)")
    wanted = [(data.lang, str(getattr(data.split, "value", data.split)))]
    if demos:
        wanted.append((demos if isinstance(demos, str) else data.lang, "train"))
    files = [babi_file(data.path, lang, data.task, split) for lang, split in dict.fromkeys(wanted)]
    for path in files:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _PARSED:
            _PARSED[key] = len(load_babi_file(path))
    return files


_HUB_ANSWERS: list[bool] = []  # whether the hub answered, asked once a process


def check_babi_hub(data: DataConfig) -> None:
    """``data=babi_hub`` needs the Hugging Face hub: refused before any job runs where
    ``HF_HUB_OFFLINE`` is set or the hub does not answer (asked once a process,
    :func:`ih_sweep.model.loading.hub_reachable`). Raises :class:`DataError`."""
    if data.name != DataSource.babi_hub:
        return
    from huggingface_hub import constants

    from ih_sweep.model.loading import hub_reachable

    if not constants.HF_HUB_OFFLINE and not _HUB_ANSWERS:
        _HUB_ANSWERS.append(hub_reachable())
    if constants.HF_HUB_OFFLINE or not _HUB_ANSWERS[0]:
        raise DataError(HUB_OFFLINE)


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

"""Every bAbI input a user can get wrong (a file's lines, the folder it lies in, the path to
it, the hub offline) is refused in one line naming the path, exit status 2, by the checks
before any job runs (:mod:`ih_sweep.pipeline.preflight`): never a traceback, never taken
silently, never found only inside a job after the model has loaded. Real files, folders,
links and named pipes; the permission cases in a process that permissions bind (as root:
setpriv dropping the capabilities that bypass them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from compose_config import ROOT
from preflight_refusals import bound_by_permissions, refusal, refusal_bound_by_permissions

from ih_sweep.data.sources import load_babi_file

FILE = "qa1_single-supporting-fact_train.txt"
HELP = ("the third field of a question lists the ids of the story's earlier statements that "
        "answer it, separated by spaces (e.g. '3 7')")
GIVE = "give the folder of the extracted release (tasks_1-20_v1-2"
GOOD = "1 Mary went to the kitchen.\n2 John went to the garden.\n3 Where is Mary?\tkitchen\t1\n"


def release(tmp_path: Path, content: bytes | str = GOOD, name: str = FILE,
            lang: str = "en") -> tuple[Path, Path]:
    """(release folder, task file) with ``content`` in ``<folder>/<lang>/<name>``."""
    root = tmp_path / "babi"
    (root / lang).mkdir(parents=True, exist_ok=True)
    path = root / lang / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root, path


def files(root: Path, *more: str) -> tuple[str, ...]:
    return ("data=babi_files", f"data.path={root}", "data.lang=en", *more)


# (name, content of the task file, the message after "data error: <file>")
CONTENT_CASES = [
    ("support x", "1 Mary went to the kitchen.\n2 Where is Mary?\tkitchen\tx\n",
     f":2: supporting id 'x' is not a line id (a number); {HELP}"),
    ("support 99", "1 Mary went to the kitchen.\n2 Where is Mary?\tkitchen\t99\n",
     ":2: supporting id '99' names no earlier line of this story (its earlier lines have "
     f"ids 1 to 1); {HELP}"),
    ("support later line", "1 Mary went to the kitchen.\n2 Where is Mary?\tkitchen\t3\n"
     "3 John went home.\n4 Where is John?\thome\t3\n",
     ":2: supporting id '3' names no earlier line of this story (its earlier lines have "
     f"ids 1 to 1); {HELP}"),
    ("support itself", "1 Where is Mary?\tkitchen\t1\n",
     f":1: supporting id '1' names no earlier line of this story (the question is its "
     f"first line); {HELP}"),
    ("support a question", GOOD + "4 Where is John?\tgarden\t3\n",
     f":4: supporting id '3' names a question (line 3), not a statement; {HELP}"),
    ("support of the story before", GOOD + "1 Sandra went to the office.\n"
     "2 Where is Sandra?\toffice\t3\n",
     ":5: supporting id '3' names no earlier line of this story (its earlier lines have "
     f"ids 1 to 1); {HELP}"),
    ("support with commas", "1 Mary went to the kitchen.\n2 John went home.\n"
     "3 Where is Mary?\tkitchen\t1,2\n",
     f":3: supporting id '1,2' is not a line id (a number); {HELP}"),
    ("support negative", "1 Mary went to the kitchen.\n2 Where is Mary?\tkitchen\t-1\n",
     f":2: supporting id '-1' is not a line id (a number); {HELP}"),
    ("support 0", "1 Mary went to the kitchen.\n2 Where is Mary?\tkitchen\t0\n",
     ":2: supporting id '0' names no earlier line of this story (its earlier lines have "
     f"ids 1 to 1); {HELP}"),
    ("id repeated", "1 Mary went to the kitchen.\n2 John went home.\n2 Sandra left.\n"
     "3 Where is Mary?\tkitchen\t1\n",
     ":3: id 2 after id 2; the ids of a story count up (1, 2, 3, ...) and a new story "
     "starts at 1"),
    ("id going back", "1 Mary went to the kitchen.\n2 John went home.\n3 Sandra left.\n"
     "2 Where is Mary?\tkitchen\t1\n",
     ":4: id 2 after id 3; the ids of a story count up (1, 2, 3, ...) and a new story "
     "starts at 1"),
    ("tabs turned into spaces", "1 Mary went to the kitchen.\n2 Where is Mary? kitchen 1\n",
     ":1: the story starting here has no question (a line 'ID question<TAB>answer<TAB>"
     "supporting ids') (were its tabs turned into spaces?)"),
    ("unicode digit id", "1 Mary went to the kitchen.\n\u0662 Where is Mary?\tkitchen\t1\n",
     ":2: expected 'ID text' (a line number, a space, the text), got "
     "'\u0662 Where is Mary?\\tkitchen\\t1'"),
    ("only blank lines", " \n\n\t\n\r\n",
     ": no story in it (it is empty or blank); a bAbI file holds lines '1 text', "
     "'2 text', ..., 'N question<TAB>answer<TAB>ids'"),
    ("empty", "", ": no story in it (it is empty or blank); a bAbI file holds lines "
     "'1 text', '2 text', ..., 'N question<TAB>answer<TAB>ids'"),
    ("story without question in the middle", GOOD + "1 Sandra went to the office.\n" + GOOD,
     ":4: the story starting here has no question (a line 'ID question<TAB>answer<TAB>"
     "supporting ids')"),
    ("question with two fields", "1 Mary went to the kitchen.\n2 Where is Mary?\tkitchen\n",
     ":2: a question line needs 'question<TAB>answer<TAB>supporting ids', got "
     "'2 Where is Mary?\\tkitchen'"),
    ("starts at 2", "2 Mary went to the kitchen.\n3 Where is Mary?\tkitchen\t2\n",
     ":1: a story must start at id 1, got 2"),
    ("no id", "Mary went to the kitchen.\n", ":1: expected 'ID text' (a line number, a "
     "space, the text), got 'Mary went to the kitchen.'"),
    ("utf-16", GOOD.encode("utf-16"), ": not UTF-8 text (byte 0); a bAbI task file is plain "
     "text"),
    ("latin-1", "1 Zo\xeb went to the caf\xe9.\n".encode("latin-1"),
     ": not UTF-8 text (byte 4); a bAbI task file is plain text"),
    ("nul bytes", b"1 Mary\x00 went.\n", ": holds NUL bytes; a bAbI task file is plain text"),
    ("huge single line", b"1 " + b"Mary went to the kitchen and " * 300_000,
     ":1: the story starting here has no question (a line 'ID question<TAB>answer<TAB>"
     "supporting ids')"),
]


@pytest.mark.parametrize("name,content,expected", CONTENT_CASES,
                         ids=[c[0] for c in CONTENT_CASES])
def test_bad_task_file_content_is_refused_before_any_job(tmp_path, name, content, expected):
    """Each damaged file is refused by the checks before any job, in one line naming the
    file and (where it is about a line) the line number."""
    root, path = release(tmp_path, content)
    assert refusal(*files(root)) == f"data error: {path}{expected}"


def test_files_as_editors_save_them_pass_the_same_checks(tmp_path):
    """A byte-order mark, Windows line ends and blank lines between stories are no
    mistake: the file passes and parses as the plain one; the same file with a support id
    naming no line is refused."""
    text = GOOD + "\n" + GOOD.replace("Mary", "Sandra")
    root, path = release(tmp_path, ("\ufeff" + text.replace("\n", "\r\n")).encode())
    assert refusal(*files(root)) == "accepted"
    plain = tmp_path / "plain.txt"
    plain.write_text(text)
    assert load_babi_file(path) == load_babi_file(plain)
    assert [s["supporting_ids"][-1] for s in load_babi_file(path)] == [["1"], ["1"]]
    path.write_bytes(text.replace("\tkitchen\t1", "\tkitchen\t01 7").encode())
    assert refusal(*files(root)) == (
        f"data error: {path}:3: supporting id '7' names no earlier line of this story (its "
        f"earlier lines have ids 1 to 2); {HELP}")


def test_demo_train_file_is_checked_too(tmp_path):
    """A prompt format with demonstrations reads the train file as well: a damaged train
    file is refused before any job although the evaluated test file is good."""
    root, test_file = release(tmp_path, GOOD, "qa1_single-supporting-fact_test.txt")
    _, train = release(tmp_path, "1 Mary went home.\n2 Where is Mary?\thome\tx\n")
    assert refusal(*files(root, "data.split=test")) == "accepted"
    assert refusal(*files(root, "data.split=test", "eval=helm")) == (
        f"data error: {train}:2: supporting id 'x' is not a line id (a number); {HELP}")


def _place(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A release folder whose task file is ``kind``; the end of the expected message."""
    root = tmp_path / "babi"
    (root / "en").mkdir(parents=True)
    path = root / "en" / FILE
    where = f"data error: {path}: "
    tail = " (data.task=1, data.split=train)"
    if kind == "folder":
        path.mkdir()
        return root, f"{where}a folder, not a file{tail}"
    if kind == "fifo":
        os.mkfifo(path)
        return root, f"{where}a named pipe (FIFO), not a regular file{tail}"
    if kind == "device":
        path.symlink_to("/dev/zero")
        return root, f"{where}a character device, not a regular file{tail}"
    if kind == "link loop":
        path.symlink_to(path)
        return root, f"{where}a loop of symbolic links (it never reaches a file){tail}"
    assert kind == "dangling link"
    path.symlink_to(tmp_path / "gone.txt")
    return root, f"{where}a symbolic link to {tmp_path / 'gone.txt'}, which does not exist{tail}"


@pytest.mark.parametrize("kind", ["folder", "fifo", "device", "link loop", "dangling link"])
def test_a_task_file_that_is_no_regular_file_is_named_for_what_it_is(tmp_path, kind):
    """Not "no such file" (the file is there) and never a read that blocks (a FIFO) or
    never ends (/dev/zero)."""
    root, expected = _place(tmp_path, kind)
    assert refusal(*files(root)) == expected


def test_wrong_folders_are_refused_before_any_job(tmp_path):
    """data.path missing, a file, without the data.lang folder (what it holds is listed),
    data.lang a file, the task file missing, data.path empty: each in one line before any
    job (they used to be found inside the job, after 18-23 s on the real data)."""
    nope = tmp_path / "nope"
    assert refusal(*files(nope)) == (
        f"data error: data.path={nope}: no folder en/ in it (data.lang=en); no such folder; "
        f"{GIVE})")
    a_file = tmp_path / "a_file.txt"
    a_file.write_text(GOOD)
    assert refusal(*files(a_file)) == (
        f"data error: data.path={a_file}: a file, not a folder; {GIVE}, holding en/, "
        "en-10k/, ...)")
    root, _ = release(tmp_path, GOOD, lang="en-10k")
    (root / "notes").mkdir()
    assert refusal(*files(root)) == (
        f"data error: data.path={root}: no folder en/ in it (data.lang=en); it holds en-10k, "
        f"notes; {GIVE})")
    (root / "en").write_text("not a folder")
    assert refusal(*files(root)) == (
        f"data error: {root / 'en'}: a file, not a folder (data.path={root}, data.lang=en)")
    (root / "en").unlink()
    (root / "en").mkdir()
    assert refusal(*files(root)) == (
        f"data error: {root / 'en'}: no {FILE} or qa1_train.txt (data.task=1, "
        "data.split=train)")
    assert refusal("data=babi_files", "data.path=", "data.lang=en") == (
        "data error: data.path is empty; give the folder of the bAbI release (the one "
        "holding en/, en-10k/, ...)")


def test_a_path_under_home_is_expanded_as_the_fingerprints_expand_it(tmp_path, monkeypatch):
    """``data.path='~/babi'`` (no shell expands ~ after ``data.path=``) reads the home
    folder's release, as the job's input fingerprints already did."""
    monkeypatch.setenv("HOME", str(tmp_path))
    release(tmp_path, GOOD.replace("\t1\n", "\tx\n"))
    assert refusal(*files(Path("'~/babi'"))) == (
        f"data error: {tmp_path / 'babi' / 'en' / FILE}:3: supporting id 'x' is not a line "
        f"id (a number); {HELP}")


def test_the_hub_offline_is_refused_before_any_job(monkeypatch):
    """data=babi_hub with HF_HUB_OFFLINE: one line before any job, not inside each."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert refusal("data=babi_hub") == (
        "data error: data=babi_hub: the Hugging Face hub does not answer from here (or "
        "HF_HUB_OFFLINE is set); use the release files: data=babi_files "
        "data.path=<folder holding en/, en-10k/>")


@pytest.mark.parametrize("what", ["file", "lang folder", "release folder"])
def test_unreadable_files_and_folders_are_refused_in_one_line(tmp_path, what):
    """chmod 000 on the task file, its en/ folder or the release folder: "not readable
    (permission denied)" naming the path, in a process permissions bind (it used to be a
    PermissionError traceback)."""
    root, path = release(tmp_path)
    locked = {"file": path, "lang folder": root / "en", "release folder": root}[what]
    expected = {
        "file": f"data error: {path}: not readable (permission denied) (data.task=1, "
                "data.split=train)",
        "lang folder": f"data error: {root / 'en'}: not readable (permission denied) "
                       f"(data.path={root}, data.lang=en)",
        "release folder": f"data error: data.path={root}: not readable (permission denied); "
                          f"{GIVE}, holding en/, en-10k/, ...)"}[what]
    locked.chmod(0)
    try:
        assert refusal_bound_by_permissions(locked, *files(root)) == expected
    finally:
        locked.chmod(0o755)


# --------------------------------------------------------------------------- the real CLI
def _cli(tmp_path: Path, *args: str, prefix: tuple[str, ...] = ()
         ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*prefix, sys.executable, "-m", "ih_sweep", *args, "debug=fast",
                           f"paths.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_refuses_a_support_id_naming_no_line_in_one_line(tmp_path):
    root, path = release(tmp_path, "1 Mary went to the kitchen.\n2 Where is Mary?\tkitchen\t99\n")
    proc = _cli(tmp_path, *files(root), f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"ih_sweep: data error: {path}:2: supporting id '99' names no earlier line of this "
        f"story (its earlier lines have ids 1 to 1); {HELP}"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "job.json").exists()


def test_cli_refuses_an_unreadable_task_file_in_one_line(tmp_path):
    root, path = release(tmp_path)
    path.chmod(0)
    try:
        proc = _cli(tmp_path, *files(root), f"hydra.run.dir={tmp_path / 'run'}",
                    prefix=tuple(bound_by_permissions()))
    finally:
        path.chmod(0o644)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"ih_sweep: data error: {path}: not readable (permission denied) (data.task=1, "
        "data.split=train)"]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_cli_sweep_with_a_wrong_data_path_runs_no_job(tmp_path):
    """A sweep on a folder without the task file: refused before its first job (no job
    folder gets a record), one line naming the folder once for all 4 jobs, exit 2."""
    root = tmp_path / "babi"
    (root / "en").mkdir(parents=True)
    sweep = tmp_path / "sweep"
    proc = _cli(tmp_path, "-m", *files(root), "n_heads=4,8", "condition=high,none",
                f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stdout + proc.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith("ih_sweep: data error: "), lines  # as a single run says
    assert f"{root / 'en'}: no {FILE} or qa1_train.txt (data.task=1, data.split=train)" \
        in lines[0], lines
    assert lines[0].endswith(" (all 4 jobs); none of the sweep's 4 jobs ran"), lines
    assert not list(sweep.rglob("job.json"))


def census_cases(tmp_path: Path) -> list[tuple[str, list[str]]]:
    """This module's refusals as (name, CLI arguments), their files written under
    ``tmp_path``, for scripts/bad_inputs_census.py (which runs each through the real CLI,
    bound by file permissions when run as root)."""
    cases = []
    for i, (name, content, _) in enumerate(CONTENT_CASES):
        root, _ = release(tmp_path / f"content{i}", content)
        cases.append((f"babi {name}", list(files(root))))
    for kind in ("folder", "fifo", "device", "link loop", "dangling link"):
        folder = tmp_path / f"place_{kind.replace(' ', '_')}"
        folder.mkdir()
        root, _ = _place(folder, kind)
        cases.append((f"babi task file a {kind}", list(files(root))))
    a_file = tmp_path / "a_file.txt"
    a_file.write_text(GOOD)
    lang_file, _ = release(tmp_path / "lang_file", GOOD, lang="en-10k")
    (lang_file / "en").write_text("not a folder")
    no_task = tmp_path / "no_task" / "babi"
    (no_task / "en").mkdir(parents=True)
    cases += [("babi data.path missing", list(files(tmp_path / "nope"))),
              ("babi data.path a file", list(files(a_file))),
              ("babi no en folder", list(files(release(tmp_path / "no_en", GOOD,
                                                       lang="en-10k")[0]))),
              ("babi en a file", list(files(lang_file))),
              ("babi no task file", list(files(no_task))),
              ("babi data.path empty", ["data=babi_files", "data.path=", "data.lang=en"]),
              ("babi demo train file bad", list(files(release(
                  tmp_path / "demo", "1 Mary went home.\n2 Where is Mary?\thome\tx\n")[0],
                  "data.split=test", "eval=helm")))]
    for what in ("file", "lang folder", "release folder"):
        root, path = release(tmp_path / f"locked_{what.replace(' ', '_')}")
        {"file": path, "lang folder": root / "en", "release folder": root}[what].chmod(0)
        cases.append((f"babi unreadable {what}", list(files(root))))
    return cases

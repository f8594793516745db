"""Every score file a user can get wrong (``scoring.source=file scoring.file=...``: the
notebook's pickle of layer -> per-head scores, or a CSV table) is refused in one line naming
the file, exit status 2, by the checks before any job runs
(:mod:`ih_sweep.pipeline.preflight`): no (4, 8) array flattened into 32 heads, no
traceback for a file that cannot be read. And ``n_heads=0`` with an ablating condition:
the unablated model, said so in the job's log lines."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from compose_config import ROOT, run_job
from preflight_refusals import bound_by_permissions, refusal, refusal_bound_by_permissions

from ih_sweep.heads.scoring import load_score_file

SHAPE = "expected a 1-D array of the layer's head scores (the notebook's: shape (32,))"
ALLOWED = "allowed: a score table .csv or the notebook's pickle .pkl / .pickle"
CSV = "layer,head,prefix\n" + "".join(f"{la},{h},{0.01 * h}\n" for la in range(2)
                                      for h in range(32))


# the notebook's layers 3 and 7 are not the tiny model's: a job choosing heads with such a
# file is refused for that (test_a_score_file_of_another_model_is_refused_before_any_job);
# the file's format alone is checked for a job that does not choose heads
FORMAT_ONLY = "condition=none"


def scores(*more: str) -> tuple[str, ...]:
    return ("scoring.source=file", *(f"scoring.file={m}" for m in more[:1]), *more[1:])


def good_pickle(**layers) -> dict:
    """The notebook's structure: layer (int) -> a (32,) float array; ``layers`` replace
    some values (``L3=...``)."""
    out: dict = {la: np.linspace(0, 1, 32) for la in (3, 7)}
    for key, value in layers.items():
        out[int(key[1:])] = value
    return out


# (name, the layer values of the pickle, the message after "score file error: scoring.file=<file>")
PICKLE_CASES = [
    ("(4, 8) per layer", good_pickle(L3=np.ones((4, 8)), L7=np.ones((4, 8))),
     f": layer 3: ndarray of shape (4, 8); {SHAPE}"),
    ("(32, 1) per layer", good_pickle(L7=np.ones((32, 1))),
     f": layer 7: ndarray of shape (32, 1); {SHAPE}"),
    ("0-d array", good_pickle(L3=np.array(0.5)), f": layer 3: ndarray of shape (); {SHAPE}"),
    ("a float", good_pickle(L7=0.5), f": layer 7: float of shape (); {SHAPE}"),
    ("empty layer", good_pickle(L7=np.array([])), f": layer 7: ndarray of shape (0,); {SHAPE}"),
    ("ragged lengths", good_pickle(L7=np.ones(31)),
     ": layers hold different numbers of heads (layer 3: 32, layer 7: 31); every layer "
     "needs one score per head"),
    ("strings", good_pickle(L3=np.array(["0.5"] * 32)),
     f": layer 3: holds ndarray of dtype <U3, not numbers; {SHAPE}"),
    ("booleans", good_pickle(L3=np.ones(32, dtype=bool)),
     f": layer 3: holds ndarray of dtype bool, not numbers; {SHAPE}"),
    ("complex", good_pickle(L3=np.ones(32, dtype=complex)),
     f": layer 3: holds ndarray of dtype complex128, not numbers; {SHAPE}"),
    ("None in a list", good_pickle(L3=[None] + [0.1] * 31),
     f": layer 3: holds list of dtype object, not numbers; {SHAPE}"),
    ("a dict", good_pickle(L3={0: 0.1}), f": layer 3: holds dict of dtype object, not "
     f"numbers; {SHAPE}"),
    ("ragged nested list", good_pickle(L3=[[0.1, 0.2], [0.3]]),
     f": layer 3: a ragged or mixed sequence, not an array of numbers; {SHAPE}"),
    ("layer key a string", {"3": np.ones(32)}, ": layer key '3' is not an integer >= 0"),
    ("all NaN", good_pickle(L3=np.full(32, np.nan), L7=np.full(32, np.nan)),
     ": no finite score in prefix, copying, combined, fv"),
]


@pytest.mark.parametrize("name,content,expected", PICKLE_CASES,
                         ids=[c[0] for c in PICKLE_CASES])
def test_bad_score_pickles_are_refused_before_any_job(tmp_path, name, content, expected):
    """Each wrong structure is refused in one line naming the file, the layer and what was
    found against what is expected, before any job (a (4, 8) array was flattened into 32
    heads and used)."""
    path = tmp_path / "ih_scores_dict.pkl"
    path.write_bytes(pickle.dumps(content))
    assert refusal(*scores(path)) == f"score file error: scoring.file={path}{expected}"


def test_the_notebook_structure_and_lists_pass(tmp_path):
    """The notebook's structure (numpy int keys included, NaN for unscored heads, a list
    of floats) passes; the same file holding one (4, 8) layer does not."""
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps({np.int64(3): np.r_[np.nan, np.ones(31)],
                                   7: list(np.linspace(0, 1, 32))}))
    assert refusal(*scores(path), FORMAT_ONLY) == "accepted"
    path.write_bytes(pickle.dumps({3: np.ones(32), 7: np.ones((4, 8))}))
    assert refusal(*scores(path)) == (
        f"score file error: scoring.file={path}: layer 7: ndarray of shape (4, 8); {SHAPE}")


# (name, file name, content, the message after "score file error: scoring.file=<file>")
FILE_CASES = [
    ("suffix .txt", "scores.txt", CSV, f": the name ends in .txt; {ALLOWED}"),
    ("no suffix", "scores", CSV, f": the name ends in no suffix; {ALLOWED}"),
    ("suffix .tsv", "scores.tsv", CSV.replace(",", "\t"), f": the name ends in .tsv; {ALLOWED}"),
    ("csv not text", "scores.csv", b"\xff\xfe\x00\x01" * 10,
     ": not a CSV table ('utf-8' codec can't decode byte 0xff in position 0: invalid start "
     "byte)"),
    ("csv semicolons", "scores.csv", CSV.replace(",", ";"),
     ": a score table needs columns layer, head and one of prefix, copying, combined, fv; "
     "it has layer;head;prefix"),
    ("csv layer 0.5", "scores.csv", "layer,head,prefix\n0.5,0,1\n",
     ":2: layer=0.5; ids are integers >= 0 (0-based)"),
]


@pytest.mark.parametrize("name,file_name,content,expected", FILE_CASES,
                         ids=[c[0] for c in FILE_CASES])
def test_bad_score_files_are_refused_before_any_job(tmp_path, name, file_name, content,
                                                    expected):
    path = tmp_path / file_name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    assert refusal(*scores(path)) == f"score file error: scoring.file={path}{expected}"


def test_suffixes_in_capitals_a_bom_and_windows_line_ends_pass(tmp_path):
    """A pickle named .PKL is read as a pickle (it was read as a CSV and refused as
    'not a CSV table'); a CSV with a byte-order mark and Windows line ends passes."""
    upper = tmp_path / "SCORES.PKL"
    upper.write_bytes(pickle.dumps(good_pickle()))
    assert refusal(*scores(upper), FORMAT_ONLY) == "accepted"
    assert len(load_score_file(upper)) == 64
    bom = tmp_path / "scores.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + CSV.replace("\n", "\r\n").encode())
    assert refusal(*scores(bom)) == "accepted"  # the tiny model's 2 x 32 heads


def test_a_score_file_of_another_model_is_refused_before_any_job(tmp_path):
    """Layers or heads the model (config.json) does not have: refused by the checks before
    any job, for a job choosing heads with the file (it was found inside each job, after
    the model loaded); a layer with some of its heads only, too."""
    notebook = tmp_path / "ih_scores_dict.pkl"
    notebook.write_bytes(pickle.dumps(good_pickle()))
    assert refusal(*scores(notebook), "condition=high") == (
        f"score file error: scoring.file={notebook}: it has layers up to 7 and heads up to "
        "31, but the model has 2 layers x 32 heads (ids are 0-based); is it the score file "
        "of another model?")
    part = tmp_path / "part.csv"
    part.write_text("layer,head,prefix\n" + "".join(f"1,{h},0.5\n" for h in range(20)))
    assert refusal(*scores(part), "condition=low") == (
        f"score file error: scoring.file={part}: layer 1 has 20 of the model's 32 heads; a "
        "layer in the table needs all of them")
    assert refusal(*scores(part), "condition=none") == "accepted"


def test_a_huge_single_line_is_refused_in_one_short_line(tmp_path):
    """A 4 MB header line: one short line at once (pandas took minutes over it)."""
    path = tmp_path / "scores.csv"
    path.write_text("layer,head,prefix" + ",x" * 2_000_000 + "\n0,0,1\n")
    assert refusal(*scores(path)) == (
        f"score file error: scoring.file={path}: its first line has 2,000,003 columns; a "
        "score table has layer, head and a few score columns (at most 256)")


def _place(tmp_path: Path, kind: str) -> tuple[Path, str]:
    path = tmp_path / "scores.pkl"
    if kind == "folder":
        path.mkdir()
        return path, "a folder, not a file"
    if kind == "fifo":
        os.mkfifo(path)
        return path, "a named pipe (FIFO), not a regular file"
    if kind == "device":
        path = tmp_path / "scores.csv"
        path.symlink_to("/dev/null")
        return path, "a character device, not a regular file"
    if kind == "link loop":
        path.symlink_to(path)
        return path, "a loop of symbolic links (it never reaches a file)"
    if kind == "dangling link":
        path.symlink_to(tmp_path / "gone.pkl")
        return path, f"a symbolic link to {tmp_path / 'gone.pkl'}, which does not exist"
    assert kind == "missing"
    return path, "no such score file"


@pytest.mark.parametrize("kind", ["folder", "fifo", "device", "link loop", "dangling link",
                                  "missing"])
def test_a_score_path_that_is_no_regular_file_is_named_for_what_it_is(tmp_path, kind):
    """Not "no such score file" where something is there, and never a read that blocks."""
    path, why = _place(tmp_path, kind)
    assert refusal(*scores(path)) == f"score file error: scoring.file={path}: {why}"


@pytest.mark.parametrize("suffix", [".csv", ".pkl"])
def test_unreadable_score_files_are_refused_in_one_line(tmp_path, suffix):
    """chmod 000 on a score CSV or pickle: one line, in a process permissions bind (it
    was a PermissionError traceback)."""
    path = tmp_path / f"scores{suffix}"
    path.write_bytes(CSV.encode() if suffix == ".csv" else pickle.dumps(good_pickle()))
    path.chmod(0)
    try:
        got = refusal_bound_by_permissions(path, *scores(path))
    finally:
        path.chmod(0o644)
    assert got == f"score file error: scoring.file={path}: not readable (permission denied)"


def test_cli_refuses_a_4_by_8_pickle_in_one_line(tmp_path):
    path = tmp_path / "ih_scores_dict.pkl"
    path.write_bytes(pickle.dumps({la: np.ones((4, 8)) for la in range(2)}))
    proc = subprocess.run(
        [*bound_by_permissions(), sys.executable, "-m", "ih_sweep", "debug=fast", "n_heads=4",
         "condition=high", *scores(path), f"hydra.run.dir={tmp_path / 'run'}",
         f"paths.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True, text=True,
        timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"ih_sweep: score file error: scoring.file={path}: layer 0: ndarray of shape (4, 8); "
        f"{SHAPE}"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "job.json").exists()


def test_n_heads_0_with_an_ablating_condition_is_said_to_be_the_unablated_model(tmp_path,
                                                                              caplog):
    """``-m n_heads=0,4,8 condition=high,low`` is a dose sweep whose N = 0 is the unablated
    model (the rules name n_heads=0 as no ablation, the config hash and the summary count it
    as condition=none): kept, and the job's lines say so, with the accuracy also when the
    finished evaluation is reused."""
    caplog.set_level(logging.INFO, logger="ih_sweep")
    args = ("debug=fast", "data.n_stories=2", "n_heads=0", "mechanism.enabled=false")
    first = run_job(tmp_path / "a", *args, "condition=high")
    assert (first.condition, first.n_heads, first.heads) == ("none", 0, [])
    said = [r.getMessage() for r in caplog.records if "correct" in r.getMessage()]
    assert said == [f"n_heads=0 condition=high (ablates no head: the unablated model, recorded "
                    f"as condition=none): {first.n_correct}/{first.n_items} correct "
                    f"({100 * first.accuracy:.1f}%), written to {tmp_path / 'a'}"]
    caplog.clear()
    again = run_job(tmp_path / "b", *args, "condition=low")
    assert again.reused_evaluation and again.n_correct == first.n_correct
    said = [r.getMessage() for r in caplog.records if "reusing" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith(
        "for n_heads=0 condition=low (ablates no head: the unablated model, recorded as "
        f"condition=none): {first.n_correct}/{first.n_items} correct "
        f"({100 * first.accuracy:.1f}%)"), said


def census_cases(tmp_path: Path) -> list[tuple[str, list[str]]]:
    """This module's refusals as (name, CLI arguments), their files written under
    ``tmp_path``, for scripts/bad_inputs_census.py."""
    cases = []
    for i, (name, content, _) in enumerate(PICKLE_CASES):
        path = tmp_path / f"pickle{i}" / "ih_scores_dict.pkl"
        path.parent.mkdir()
        path.write_bytes(pickle.dumps(content))
        cases.append((f"score pickle {name}", list(scores(path))))
    for i, (name, file_name, content, _) in enumerate(FILE_CASES):
        path = tmp_path / f"file{i}" / file_name
        path.parent.mkdir()
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        cases.append((f"score file {name}", list(scores(path))))
    huge = tmp_path / "huge.csv"
    huge.write_text("layer,head,prefix" + ",x" * 2_000_000 + "\n0,0,1\n")
    cases.append(("score csv huge first line", list(scores(huge))))
    other = tmp_path / "another_model.pkl"
    other.write_bytes(pickle.dumps(good_pickle()))
    cases.append(("score file of another model", [*scores(other), "condition=high"]))
    for kind in ("folder", "fifo", "device", "link loop", "dangling link", "missing"):
        folder = tmp_path / f"place_{kind.replace(' ', '_')}"
        folder.mkdir()
        path, _ = _place(folder, kind)
        cases.append((f"score path a {kind}", list(scores(path))))
    for suffix in (".csv", ".pkl"):
        path = tmp_path / f"locked{suffix}"
        path.write_bytes(CSV.encode() if suffix == ".csv" else pickle.dumps(good_pickle()))
        path.chmod(0)
        cases.append((f"score file unreadable {suffix}", list(scores(path))))
    return cases

"""Environments users have (issue 29), through the real CLI in real processes:
``hydra.job.chdir=True``; two commands started in the same second; two processes on the
same job (the job lock, a holder killed with ``kill -9``); a job folder the file system
will not write. Hydra's clock is pinned (:data:`PINNED`) where two commands must start "in
the same second": the one thing simulated; every file, lock and process is real."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from compose_config import compose

from ih_sweep.config.hydra import settings
from ih_sweep.config.identity import config_hash
from ih_sweep.pipeline.records import job_lock_path

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
FAST = ("debug=fast", "eval.progress=false")
STAMP = "2030-01-02_03-04-05"
# python PINNED ARGS: the CLI with Hydra's ${now:} at 2030-01-02 03:04:05
PINNED = """\
import datetime, sys
import hydra.core.utils

class Pinned(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2030, 1, 2, 3, 4, 5)

hydra.core.utils.datetime = Pinned
sys.argv = ["ih_sweep", *sys.argv[1:]]
from ih_sweep.cli import cli
cli()
"""
WAITING = "waiting for another process evaluating"


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m ih_sweep ARGS`` from ``cwd`` (this checkout's package first on the path)."""
    proc = subprocess.run([sys.executable, "-m", "ih_sweep", *args], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def start(args: list[str], cwd: Path, log: Path, pinned: bool = False, **kw
          ) -> subprocess.Popen:
    """The CLI (``python -m ih_sweep ARGS``; ``pinned``: with Hydra's clock pinned) in the
    background, its stdout and stderr into ``log``."""
    if pinned:
        # the script as ``-c``, not a file: a file rewritten by the next start() while this
        # process opens it can be read empty, and an empty script exits 0 with no output
        cmd = [sys.executable, "-c", PINNED, *args]
    else:
        cmd = [sys.executable, "-m", "ih_sweep", *args]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=out, stderr=subprocess.STDOUT,
                                **kw)


def finish(proc: subprocess.Popen, log: Path) -> tuple[int, str]:
    return proc.wait(timeout=900), log.read_text()


def wait_for(text: str, log: Path, proc: subprocess.Popen, limit_s: float = 600) -> None:
    """Until ``log`` holds ``text`` (fails if the process ends first, or after limit_s)."""
    deadline = time.monotonic() + limit_s
    while text not in log.read_text():
        assert proc.poll() is None, f"ended (exit {proc.returncode}) before {text!r}:\n" \
                                    + log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in {limit_s} s"
        time.sleep(0.2)


def results(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "results.csv")


# --------------------------------------------------------------------- hydra.job.chdir
def test_chdir_sweep_resolves_paths_against_the_original_directory(tmp_path):
    """Before: the cache landed in each job folder, the summary counted 4 jobs and its
    heatmap failed (a relative score-file path), exit 1."""
    args = ["-m", "n_heads=2,4", "condition=high", *FAST]
    chdir = cli(*args, "hydra.job.chdir=True", "hydra.sweep.dir=chdir", cwd=tmp_path,
                check=False)
    assert chdir.returncode == 0, chdir.stderr[-3000:]
    plain = cli(*args, "hydra.sweep.dir=plain", "paths.cache_dir=plain_cache", cwd=tmp_path)
    assert plain.returncode == 0
    jobs = sorted(p.parent.name for p in (tmp_path / "chdir").glob("*/job.json"))
    assert jobs == ["condition=high,debug=fast,n_heads=2", "condition=high,debug=fast,n_heads=4"]
    for job in jobs:
        pd.testing.assert_frame_equal(results(tmp_path / "chdir" / job),
                                      results(tmp_path / "plain" / job))
        assert not (tmp_path / "chdir" / job / "outputs").exists()  # no cache of its own
    assert len(list((tmp_path / "outputs" / "cache" / "jobs").glob("*/job.json"))) == 2
    assert len(list((tmp_path / "outputs" / "cache" / "scores").glob("*.csv"))) == 1
    assert "summary of 2 jobs" in chdir.stdout + chdir.stderr
    assert (tmp_path / "chdir" / "heads_prefix.png").is_file()
    assert len(pd.read_csv(tmp_path / "chdir" / "summary.csv")) == 2


# --------------------------------------------------------------------- same second
@pytest.fixture(scope="module")
def same_second(tmp_path_factory):
    """Two sweeps (and two single runs) started together, Hydra's clock pinned to the same
    second, from one working directory."""
    cwd = tmp_path_factory.mktemp("same_second")
    runs = [(["-m", "n_heads=2,4", "condition=high", *FAST], "a.log"),
            (["-m", "n_heads=2", "condition=low", *FAST], "b.log"),
            (["job=score", "debug=fast"], "c.log"),
            (["job=score", "debug=fast"], "d.log")]
    procs = [(start(args, cwd, cwd / log, pinned=True), cwd / log) for args, log in runs]
    return cwd, [finish(p, log) for p, log in procs]


def test_two_sweeps_in_the_same_second_get_two_folders(same_second):
    """Before: one folder for both, each summary mixing the other's jobs, one exit 1."""
    cwd, done = same_second
    for code, out in done[:2]:
        assert code == 0 and "one folder per job in:" in out, out[-3000:]
    folders = sorted((cwd / "outputs" / "multirun").iterdir())
    assert len(folders) == 2 and all(f.name.startswith(STAMP + "_") for f in folders)
    by_size = sorted(folders, key=lambda f: len(list(f.glob("*/job.json"))))
    assert [sorted(p.parent.name for p in f.glob("*/job.json")) for f in by_size] == [
        ["condition=low,debug=fast,n_heads=2"],
        ["condition=high,debug=fast,n_heads=2", "condition=high,debug=fast,n_heads=4"]]
    assert [len(pd.read_csv(f / "summary.csv")) for f in by_size] == [1, 2]
    named = [line.rsplit("/", 1)[-1].strip() for _, out in done[:2] for line in out.splitlines()
             if "one folder per job in:" in line]
    assert sorted(named) == sorted(f.name for f in folders)  # each names its own


def test_two_runs_in_the_same_second_get_two_folders(same_second):
    cwd, done = same_second
    for code, out in done[2:]:
        assert code == 0 and "scores.csv" in out, out[-3000:]
    folders = sorted((cwd / "outputs" / "runs").iterdir())
    assert len(folders) == 2 and all(f.name.startswith(STAMP + "_") for f in folders)
    assert all((f / "scores.csv").is_file() for f in folders)


def test_a_local_submitit_sweep_keeps_one_folder_for_all_its_jobs(same_second):
    """submitit's local launcher runs each job in a process of its own: each job resolves
    the sweep folder from the config pickled with it and must land in the launcher's
    folder (not the earlier sweeps' of the same second, not one of its own)."""
    cwd, _ = same_second
    before = set((cwd / "outputs" / "multirun").iterdir())
    proc = start(["-m", "n_heads=2,4", "condition=high", "hydra/launcher=local", *FAST], cwd,
                 cwd / "e.log", pinned=True)
    code, out = finish(proc, cwd / "e.log")
    assert code == 0, out[-3000:]
    (new,) = set((cwd / "outputs" / "multirun").iterdir()) - before
    assert new.name.startswith(STAMP + "_")
    assert sorted(p.parent.name for p in new.glob("*/job.json")) == [
        "condition=high,debug=fast,n_heads=2", "condition=high,debug=fast,n_heads=4"]
    assert (new / ".submitit").is_dir() and len(pd.read_csv(new / "summary.csv")) == 2
    for old in before:  # the earlier sweeps are as they were
        assert not list(old.glob("condition=high*/.submitit*"))


# --------------------------------------------------------------------- the job lock
def lock_of(cache: Path, *overrides: str) -> Path:
    return job_lock_path(cache, config_hash(settings(compose(*overrides))))


JOB = ("n_heads=2", "condition=high", *FAST)


def hold(lock: Path) -> subprocess.Popen:
    """Another process holding ``lock`` (filelock, as a job does) until killed."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    code = ("import sys, time\nfrom filelock import FileLock\n"
            f"lock = FileLock({str(lock)!r})\nlock.acquire()\n"
            "print('held', flush=True)\ntime.sleep(900)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_two_processes_on_one_job_evaluate_it_once(tmp_path):
    """Both wait while the job's lock is held elsewhere; once it is free, one evaluates and
    the other waits for it and reuses its job. Before: no lock, both evaluated."""
    cache = tmp_path / "cache"
    holder = hold(lock_of(cache, *JOB))
    procs = [(start([*JOB, f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path}/{n}"],
                    tmp_path, tmp_path / f"{n}.log"), tmp_path / f"{n}.log") for n in "ab"]
    try:
        for proc, log in procs:
            wait_for(WAITING, log, proc)
    finally:
        holder.kill()
        holder.wait()
    done = [finish(p, log) for p, log in procs]
    for code, out in done:
        assert code == 0, out[-3000:]
    records = [json.loads((tmp_path / n / "job.json").read_text()) for n in "ab"]
    assert sorted(r["reused_evaluation"] for r in records) == [False, True]
    assert sum(out.count("evaluated 20 items") for _, out in done) == 1
    assert sum("reusing its finished evaluation" in out for _, out in done) == 1
    pd.testing.assert_frame_equal(results(tmp_path / "a"), results(tmp_path / "b"))


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    """The holder is killed with SIGKILL while the job waits for it: the operating system
    releases its lock, the job evaluates and ends with exit 0 (the lock file stays)."""
    cache = tmp_path / "cache"
    lock = lock_of(cache, *JOB)
    holder = hold(lock)
    proc = start([*JOB, f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path}/run"], tmp_path,
                 tmp_path / "run.log")
    try:
        wait_for(WAITING, tmp_path / "run.log", proc)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    code, out = finish(proc, tmp_path / "run.log")
    assert code == 0, out[-3000:]
    assert json.loads((tmp_path / "run" / "job.json").read_text())["reused_evaluation"] is False
    assert lock.exists()
    cli(*JOB, f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path}/again",
        cwd=tmp_path)  # the file left behind locks nothing
    assert json.loads((tmp_path / "again" / "job.json").read_text())["reused_evaluation"]


# --------------------------------------------------------------------- unwritable folders
def failure_lines(stderr: str) -> list[str]:
    lines = stderr.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if "jobs failed" in line)
    return [line.strip() for line in lines[start + 1:] if not line.strip().startswith(
        "summary:")]


def test_a_job_folder_that_cannot_be_made_fails_that_job_alone(tmp_path):
    """A file where a job's folder goes (refused as for any user, root included): Hydra
    cannot create the folder. Before: Hydra's traceback, the later jobs never ran, no
    summary."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "condition=high,debug=fast,n_heads=2").write_text("not a folder")
    proc = cli("-m", "n_heads=1,2,4", "condition=high", *FAST, f"hydra.sweep.dir={sweep}",
               cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert failure_lines(proc.stderr) == [
        "condition=high,debug=fast,n_heads=2: WriteError: [Errno 17] "
        f"cannot write the job folder {sweep}/condition=high,debug=fast,n_heads=2: "
        "File exists"]
    assert sorted(p.parent.name for p in sweep.glob("*/job.json")) == [
        "condition=high,debug=fast,n_heads=1", "condition=high,debug=fast,n_heads=4"]
    assert len(pd.read_csv(sweep / "summary.csv")) == 2


def test_a_write_refused_mid_sweep_fails_that_job_alone(tmp_path):
    """The file system refuses a job's results (RLIMIT_FSIZE in the command's process:
    writes past 12 kB fail with EFBIG, as a full disk fails with ENOSPC): the job whose
    results are larger fails in one line naming its file and the error; the smaller job
    finishes, and the summary of it is written where it fits. Before: the line said only
    "OSError: [Errno 27] File too large"."""
    cache = tmp_path / "cache"
    cli("job=score", "debug=fast", f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path}/s",
        cwd=tmp_path)  # the score table and its heatmap are larger than the limit

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (12_000, 12_000))

    sweep = tmp_path / "sweep"
    log = tmp_path / "full.log"
    proc = start(["-m", "data.n_stories=20,100", "n_heads=2", *FAST, f"paths.cache_dir={cache}",
                  f"hydra.sweep.dir={sweep}"], tmp_path, log, preexec_fn=limit)
    code, out = finish(proc, log)
    assert code == 1
    failed = sweep / "data.n_stories=100,debug=fast,n_heads=2"
    (line,) = failure_lines(out)
    assert line.startswith(f"{failed.name}: WriteError: [Errno 27] cannot write {failed}/")
    assert line.endswith("(File too large)")
    assert (sweep / "data.n_stories=20,debug=fast,n_heads=2" / "job.json").is_file()
    assert not (failed / "job.json").exists()
    assert len(pd.read_csv(sweep / "summary.csv")) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_job_folder_fails_that_job_alone(tmp_path):
    """A job folder made read-only (chmod 555) before Hydra saves its config there."""
    sweep = tmp_path / "sweep"
    folder = sweep / "condition=high,debug=fast,n_heads=2"
    folder.mkdir(parents=True)
    folder.chmod(0o555)
    try:
        proc = cli("-m", "n_heads=1,2", "condition=high", *FAST, f"hydra.sweep.dir={sweep}",
                   cwd=tmp_path, check=False)
    finally:
        folder.chmod(0o755)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = failure_lines(proc.stderr)
    assert f"cannot write the job folder {folder}" in line and "Permission denied" in line
    assert (sweep / "condition=high,debug=fast,n_heads=1" / "job.json").is_file()


# ------------------------------------------------------------------ a file system refusing
def _tiny_file_limit() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))


@pytest.mark.parametrize("mode", ["run", "sweep"])
def test_hydras_own_files_refused_end_in_one_line(mode, tmp_path):
    """Hydra saving .hydra/config.yaml where the file system refuses (RLIMIT_FSIZE 1000
    bytes in the command's process: EFBIG, as a full disk gives ENOSPC): one line naming
    the folder and the system's reason, exit 1. Before: Hydra's traceback of
    OmegaConf.save."""
    key, flag = ("hydra.run.dir", []) if mode == "run" else ("hydra.sweep.dir", ["-m"])
    folder = tmp_path / mode
    proc = subprocess.run([sys.executable, "-m", "ih_sweep", *flag, *FAST,
                           f"paths.cache_dir={tmp_path / 'cache'}", f"{key}={folder}"],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600,
                          preexec_fn=_tiny_file_limit)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ih_sweep: write error: [Errno 27] cannot write Hydra's files (.hydra/, "
        f"multirun.yaml) in {folder} ({key}) (File too large)")


def _tmpfs(folder: Path, size: str) -> bool:
    """A tmpfs of ``size`` mounted on ``folder`` (root only); False where none can be."""
    folder.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                           str(folder)], capture_output=True).returncode == 0


def test_a_full_disk_under_the_cache_ends_a_run_in_one_line(tmp_path):
    """A real full disk (a 64 KiB tmpfs, filled) holding paths.cache_dir: the run's results
    cannot be stored; one line naming the file and "No space left on device", exit 1.
    Before: a WriteError traceback."""
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "64k"):
        pytest.skip("needs root and a tmpfs mount")
    try:
        (disk / "cache").mkdir()
        with open(disk / "fill", "wb") as fill:
            try:
                fill.write(b"\0" * 70_000)
            except OSError:
                pass
        proc = cli(*FAST, f"paths.cache_dir={disk / 'cache'}",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ih_sweep: write error: [Errno 28] cannot write {disk / 'cache'}/")
    assert last.endswith("(No space left on device)")

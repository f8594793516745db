"""The sweep on a real SLURM cluster (scripts/slurm_local.sh), and faults that lose nothing.

Skips when no cluster answers; under CI (REQUIRE_SLURM=1) a missing cluster is a failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
DEFAULT_CONF = Path(os.environ.get("IH_SLURM_DIR", "/tmp/ih_sweep_slurm")) / "etc/slurm.conf"


USABLE = ("idle", "mix", "alloc", "comp")  # sinfo's short node states that take jobs


def _cluster_env(limit_s: float) -> dict | None:
    """The environment to reach the cluster with, once a node answers in a state that takes
    jobs (a node still draining an earlier test's jobs, or a daemon slow to answer, is
    waited for up to ``limit_s``); None where no cluster answers."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("SLURM_CONF", str(DEFAULT_CONF))
    deadline = time.time() + limit_s
    while True:
        try:
            ok = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                                text=True, timeout=30)
        except FileNotFoundError:
            return None  # no SLURM installed
        except (OSError, subprocess.TimeoutExpired):
            ok = None
        if ok is not None and ok.returncode == 0 and any(
                state.rstrip("*~#!%$@^-") in USABLE for state in ok.stdout.split()):
            return env
        if time.time() >= deadline:
            return None
        time.sleep(2)


@pytest.fixture(scope="module")
def slurm_env():
    required = os.environ.get("REQUIRE_SLURM") == "1"
    env = _cluster_env(60 if required else 0)  # asked once where none is required
    if env is None:
        if required:
            pytest.fail("REQUIRE_SLURM=1 but no SLURM cluster answers "
                        "(start one with scripts/slurm_local.sh start)")
        pytest.skip("no SLURM cluster answers (scripts/slurm_local.sh start)")
    return env


def _args(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ih_sweep", "-m", "hydra/launcher=local_slurm",
            f"hydra.sweep.dir={out}", f"paths.cache_dir={out / 'cache'}", "eval.progress=false",
            *extra]


def test_main_sweep_on_slurm(slurm_env, tmp_path):
    proc = subprocess.run(_args(tmp_path, "n_heads=4,8,16", "condition=high,low,none",
                                "data.n_stories=60"),
                          cwd=ROOT, env=slurm_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(p.read_text()) for p in tmp_path.glob("*/job.json")]
    assert len(recs) == 9 and all(r["status"] == "complete" for r in recs)
    ids = {r["slurm_job_id"] for r in recs}
    assert None not in ids and len(ids) == 9
    # the three `none` jobs are one evaluation: one summary row
    assert (tmp_path / "summary.csv").is_file() and len(pd.read_csv(tmp_path / "summary.csv")) == 7
    names = subprocess.run(["sacct", "-n", "-X", "-o", "jobname%20", "-j",
                            ",".join(sorted(ids))], env=slurm_env, capture_output=True,
                           text=True).stdout.split()
    assert names and set(names) == {"ih_sweep"}


def _three_jobs(env: dict, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(_args(out, "n_heads=4", "condition=high,low,none", *extra),
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _submitted(out: Path, limit_s: float = 300) -> str:
    """The id of the job (array) this test's sweep submitted: the folder submitit makes
    for it under ``out/.submitit`` (``<id>/<id>_submission.sh``), not whatever else the
    cluster runs under the same job name (an earlier test's tasks still completing)."""
    deadline = time.time() + limit_s
    while time.time() < deadline:
        found = [p.parent.name for p in (out / ".submitit").glob("*/*_submission.sh")]
        if found:
            (job,) = found
            return job
        time.sleep(0.05)
    raise AssertionError(f"nothing submitted in {limit_s} s")


def _task(task_id: str) -> int:
    """The array index of ``<job>_<index>`` (an int: "10" sorts after "9")."""
    return int(task_id.rsplit("_", 1)[-1])


def _cancel(env: dict, out: Path, choose, poll_s: float) -> str:
    """scancel the array task ``choose`` picks from squeue's (id, state) pairs of the job
    this test's sweep submitted."""
    job = _submitted(out)
    victim = None
    deadline = time.time() + 120
    while time.time() < deadline and victim is None:
        q = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%i %T"], env=env,
                           capture_output=True, text=True).stdout.splitlines()
        victim = choose([tuple(line.split()) for line in q if line.strip()])
        if victim is None:
            time.sleep(poll_s)
    assert victim, "no array task to cancel"
    subprocess.run(["scancel", victim], env=env, check=True)
    return victim


def _one_of_three_missing(proc: subprocess.Popen, victim: str, out: Path, why: str) -> list:
    """The sweep fails naming the victim and why; the other two finished and are summarized."""
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert "1 of 3 SLURM jobs did not finish" in err and victim in err and why in err
    recs = [json.loads(p.read_text()) for p in out.glob("*/job.json")]
    assert len(recs) == 2 and all(r["status"] == "complete" for r in recs)
    md = (out / "summary.md").read_text()
    assert "Jobs left out" in md and victim in md
    return recs


def test_cancelled_job_fails_clearly_and_keeps_the_rest(slurm_env, tmp_path):
    """With array_parallelism=2 the third job waits; cancel it and check the outcome."""
    proc = _three_jobs(slurm_env, tmp_path, "data.n_stories=200",
                       "hydra.launcher.array_parallelism=2")

    def pending_while_another_runs(tasks):
        # cancelled before any task started, a task has no record at all (the next test)
        pending = sorted((t for t, state in tasks if state == "PENDING"), key=_task)
        return pending[-1] if pending and any(s == "RUNNING" for _, s in tasks) else None

    victim = _cancel(slurm_env, tmp_path, pending_while_another_runs, 0.5)
    recs = _one_of_three_missing(proc, victim, tmp_path, "CANCELLED")
    assert all(r["n_items"] == 200 for r in recs)
    assert len(pd.read_csv(tmp_path / "summary.csv")) == 2


def test_job_cancelled_before_any_started_is_reported_lost(slurm_env, tmp_path):
    """A task cancelled before the array starts has no record in squeue or sacct; submitit
    alone would wait for it forever. The launcher reports it lost and keeps the rest."""
    proc = _three_jobs(slurm_env, tmp_path, "data.n_stories=60",
                       "+hydra.launcher.additional_parameters.begin=now+8")
    victim = _cancel(slurm_env, tmp_path,
                     lambda tasks: max((t for t, _ in tasks), key=_task, default=None), 0.2)
    _one_of_three_missing(proc, victim, tmp_path, "LOST")


def test_sigkilled_job_resumes_without_duplicates_or_losses(tmp_path):
    """Kill a running job with SIGKILL after some chunks; the rerun finishes the rest."""
    # 100 chunks of 10 stories, ~27 ms each: ~2.6 s between the 3rd chunk and the last for
    # the kill to land (40 chunks left ~1 s of it)
    args = [sys.executable, "-m", "ih_sweep", "n_heads=8", "condition=high",
            "data.n_stories=1000", "eval.checkpoint_items=10", "eval.batch_size=5",
            f"hydra.run.dir={tmp_path / 'job'}", f"paths.cache_dir={tmp_path / 'cache'}",
            "eval.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = tmp_path / "job" / "partial"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(part.glob("chunk-*.csv"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(part.glob("chunk-*.csv")))
    assert 3 <= done_before < 100, done_before
    assert not (tmp_path / "job" / "job.json").exists()
    subprocess.run(args, cwd=ROOT, env=env, check=True, capture_output=True)
    rec = json.loads((tmp_path / "job" / "job.json").read_text())
    assert rec["status"] == "complete" and rec["resumed_chunks"] >= done_before - 1
    res = pd.read_csv(tmp_path / "job" / "results.csv")
    assert len(res) == 1000 and res["story"].is_unique
    assert sorted(res["story"]) == list(range(1000))
    assert not part.exists()
    # the same outcomes as an uninterrupted run
    clean = tmp_path / "clean"
    subprocess.run([*args[:-3], f"hydra.run.dir={clean}", f"paths.cache_dir={tmp_path / 'cache'}",
                    "eval.progress=false"], cwd=ROOT, env=env, check=True, capture_output=True)
    ref = pd.read_csv(clean / "results.csv")
    assert res["correct"].tolist() == ref["correct"].tolist()


def test_preempted_job_is_requeued_and_resumes(slurm_env, tmp_path):
    """SIGUSR2 is how SLURM warns of preemption/timeout: submitit checkpoints and requeues the
    job, which then resumes from its finished chunks."""
    # 100 chunks of 10 stories, ~27 ms each: ~2.6 s between the 3rd chunk and the last for
    # the signal to arrive (30 chunks left ~0.4 s of it)
    proc = subprocess.Popen(_args(tmp_path, "n_heads=8", "condition=high",
                                  "data.n_stories=1000", "eval.checkpoint_items=10",
                                  "eval.batch_size=5"),
                            cwd=ROOT, env=slurm_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    job = _submitted(tmp_path)
    deadline = time.time() + 240
    chunks: list = []
    while time.time() < deadline and len(chunks) < 3:
        chunks = list(tmp_path.glob("*/partial/chunk-*.csv"))
        time.sleep(0.05)
    assert len(chunks) >= 3, "the job never got going"
    queued = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%i"], env=slurm_env,
                            capture_output=True, text=True).stdout.split()
    assert queued, f"job {job} left the queue before it was signalled"
    job_id = queued[0]
    subprocess.run(["scancel", "--signal=USR2", job_id], env=slurm_env, check=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    rec = json.loads(next(tmp_path.glob("*/job.json")).read_text())
    assert rec["status"] == "complete" and rec["resumed_chunks"] >= 3
    res = pd.read_csv(next(tmp_path.glob("*/results.csv")))
    assert len(res) == 1000 and res["story"].is_unique
    states = subprocess.run(["sacct", "--duplicates", "-n", "-X", "-j", job_id, "-o", "state"],
                            env=slurm_env, capture_output=True, text=True).stdout.split()
    assert "REQUEUED" in states and states[-1] == "COMPLETED", states

"""Environments users have (issue 29), in-process: relative paths resolved against the
command's original working directory, a job store's copies inside a sweep folder, the job
lock's file, writes the file system refuses. The real-CLI cases are in
tests/cli/test_environments_cli.py."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
from compose_config import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from summary_jobs import make_job

from ih_sweep.config.hydra import settings, unique_stamp
from ih_sweep.io_utils import WriteError, write_text
from ih_sweep.model.loading import ASSET_DIR
from ih_sweep.pipeline.records import job_lock_path, store, store_dir
from ih_sweep.report.discover import find_jobs


@pytest.fixture
def no_hydra_config():
    """Leave HydraConfig as the test found it (settings() reads its runtime.cwd)."""
    before = HydraConfig.instance().cfg
    HydraConfig.instance().cfg = None
    yield
    HydraConfig.instance().cfg = before


def test_relative_paths_are_resolved_against_the_original_working_directory(
        tmp_path, no_hydra_config):
    """As a job with hydra.job.chdir=True sees them: Hydra's runtime.cwd is where the
    command started, the process's directory is the job folder."""
    start = tmp_path / "start"
    (start / "models" / "mine").mkdir(parents=True)
    shutil.copy(ASSET_DIR / "config.json", start / "models" / "mine" / "config.json")
    cfg = compose("model=hub", "model.path=models/mine", "data=babi_files", "data.path=babi",
                  "scoring.source=file", "scoring.file=scores/s.csv", "paths.cache_dir=cache",
                  "train.out_dir=tiny_out", return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = str(start)
    config = settings(cfg)
    assert config.paths.cache_dir == str(start / "cache")
    assert config.data.path == str(start / "babi")
    assert config.scoring.file == str(start / "scores" / "s.csv")
    assert config.train.out_dir == str(start / "tiny_out")
    assert config.model.path == str(start / "models" / "mine")
    assert config.model.name == "models/mine"  # the name the user gave, in results and plots


def test_a_hub_id_and_absolute_paths_stay_as_given(tmp_path, no_hydra_config):
    cfg = compose("model=hub", "model.path=EleutherAI/pythia-160m",
                  f"paths.cache_dir={tmp_path}/c", return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = str(tmp_path)
    config = settings(cfg)
    assert config.model.path == "EleutherAI/pythia-160m"
    assert config.paths.cache_dir == f"{tmp_path}/c"
    assert settings(compose()).model.path == "builtin:tiny"


def test_unique_stamp_differs_for_the_same_second():
    stamps = {unique_stamp("2030-01-02_03-04-05") for _ in range(50)}
    assert len(stamps) == 50
    assert all(s.startswith("2030-01-02_03-04-05_") and len(s) == 26 for s in stamps)


def test_a_job_store_inside_the_sweep_folder_is_not_counted_as_jobs(tmp_path):
    """A cache kept in the sweep folder holds a copy of each finished job: the summary
    finds each job once (hydra.job.chdir=True used to put the cache in each job folder)."""
    sweep = tmp_path / "sweep"
    for name, n in (("n_heads=2", 2), ("n_heads=4", 4)):
        folder = make_job(sweep, name, n, "high", [1, 0, 1], config_hash=f"{n:016d}")
        (folder / "heads.csv").write_text("layer,head,score,rank_by\n")
        store(folder, sweep / name / "outputs" / "cache", f"{n:016d}")
    store(sweep / "n_heads=2", sweep / "cache", f"{2:016d}")
    assert (store_dir(sweep / "cache", f"{2:016d}") / "job.json").is_file()
    found = find_jobs(sweep)
    assert sorted(j.path.name for j in found.jobs) == ["n_heads=2", "n_heads=4"]
    assert not found.problems


def test_the_job_lock_sits_beside_the_job_in_the_store(tmp_path):
    assert job_lock_path(tmp_path, "ab" * 8) == tmp_path / "jobs" / f"{'ab' * 8}.lock"


def test_a_refused_write_names_the_file_and_the_system_error(tmp_path):
    """A real refusal: the folder to write into is a file (ENOTDIR / EEXIST as for any user,
    root included)."""
    blocker = tmp_path / "job"
    blocker.write_text("not a folder")
    with pytest.raises(WriteError) as caught:
        write_text(blocker / "results.csv", "x\n")
    assert caught.value.errno in (errno.ENOTDIR, errno.EEXIST)
    assert str(blocker / "results.csv") in str(caught.value)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, OSError)


def test_a_file_too_large_is_a_write_error_and_leaves_nothing(tmp_path):
    """RLIMIT_FSIZE in a child process (Python ignores SIGXFSZ, so the write fails with
    EFBIG, as a full disk fails with ENOSPC)."""
    import subprocess
    import sys

    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
            "from ih_sweep.io_utils import write_text, WriteError\n"
            "try:\n"
            f"    write_text({str(tmp_path / 'big.csv')!r}, 'x' * 5000)\n"
            "except WriteError as err:\n"
            "    print(err.errno, err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.startswith(f"{errno.EFBIG} ") and f"cannot write {tmp_path / 'big.csv'}" in out
    assert list(tmp_path.iterdir()) == []  # no temporary left behind


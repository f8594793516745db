"""The SLURM launcher's wait, without a cluster (the real-cluster runs are in test_slurm)."""

from __future__ import annotations

import threading
import time

from hydra_plugins.ih_sweep_launcher import resilient


class FakeJob:
    def __init__(self, job_id: str, state: str, finishes_after_s: float | None):
        self.job_id, self.state = job_id, state
        self.end = None if finishes_after_s is None else time.monotonic() + finishes_after_s

    def done(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end


def _launcher():
    launcher = resilient._ResilientMixin()
    launcher._EXECUTOR = "slurm"
    return launcher


def test_wait_reports_a_job_slurm_never_heard_of_and_no_other(monkeypatch):
    monkeypatch.setattr(resilient, "POLL_S", 0.01)
    monkeypatch.setattr(resilient, "LOST_AFTER_S", 0.1)
    known = {"7_0": True, "7_1": True, "7_2": False, "7_3": None}
    monkeypatch.setattr(resilient, "slurm_knows", known.get)
    # 7_1 is unknown to submitit but queued; 7_3's status cannot be read: neither is lost
    jobs = [FakeJob("7_0", "RUNNING", 0.3), FakeJob("7_1", "UNKNOWN", 0.4),
            FakeJob("7_2", "UNKNOWN", None), FakeJob("7_3", "UNKNOWN", 0.5)]
    lost = _launcher()._wait(jobs)
    assert list(lost) == ["7_2"] and lost["7_2"].startswith("LOST")


def test_a_cancelled_pending_task_submitit_still_calls_pending_is_lost(monkeypatch):
    """submitit keeps the last state it read: a task read as PENDING, then cancelled before
    it started, stays PENDING there while SLURM has no record of it (the cause of a hang
    in test_slurm's cancelled-before-start case). A pending task SLURM still knows waits."""
    monkeypatch.setattr(resilient, "POLL_S", 0.01)
    monkeypatch.setattr(resilient, "LOST_AFTER_S", 0.1)
    monkeypatch.setattr(resilient, "slurm_knows", {"8_0": True, "8_2": False}.get)
    jobs = [FakeJob("8_0", "PENDING", 0.3), FakeJob("8_2", "PENDING", None)]
    out: dict = {}
    waiter = threading.Thread(target=lambda: out.update(_launcher()._wait(jobs)), daemon=True)
    waiter.start()
    waiter.join(timeout=30)  # before the fix it waited forever
    assert not waiter.is_alive(), "the wait never gave up on the cancelled task"
    assert list(out) == ["8_2"]


def test_slurm_knows_cannot_tell_without_slurm(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert resilient.slurm_knows("1_0") is None  # never counts as absent


class FakeLoader:
    """Hydra's config loader, as far as compose_each_job_once uses it: a composition per
    call, counted, with the master's resolver cache copied in (as Hydra's does)."""

    def __init__(self):
        self.calls = 0

    def load_sweep_config(self, master_config, sweep_overrides):
        from omegaconf import OmegaConf

        self.calls += 1
        config = OmegaConf.create({"overrides": list(sweep_overrides), "job": {"id": None}})
        OmegaConf.copy_cache(from_config=master_config, to_config=config)
        return config


def test_each_job_is_composed_once_and_every_caller_gets_its_own_copy():
    from omegaconf import OmegaConf

    loader = FakeLoader()
    master = OmegaConf.create({"stamp": "${oc.env:IH_SWEEP_TEST_UNSET,x}"})
    resilient.compose_each_job_once(loader)
    resilient.compose_each_job_once(loader)  # a second setup wraps nothing twice
    first = loader.load_sweep_config(master, ["n_heads=4"])
    first.job.id = 0  # a caller changes its copy
    OmegaConf.get_cache(master)["later"] = {"k": "v"}  # the master resolves more, later
    second = loader.load_sweep_config(master, ["n_heads=4"])
    other = loader.load_sweep_config(master, ["n_heads=8"])
    assert loader.calls == 2  # n_heads=4 once, n_heads=8 once
    assert second.job.id is None and list(second.overrides) == ["n_heads=4"]
    assert OmegaConf.get_cache(second) == OmegaConf.get_cache(master)
    assert OmegaConf.get_cache(second) is not OmegaConf.get_cache(master)
    assert list(other.overrides) == ["n_heads=8"]

"""scripts/slurm_local.sh stop ends exactly the daemons its start recorded, by pid file."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _daemon(tmp_path: Path, name: str) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen(["sleep", "300"])
    pid_file = tmp_path / f"{name}.pid"
    pid_file.write_text(f"{proc.pid}\n")
    return proc, pid_file


def _stop(state: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "slurm_local.sh"), "stop"],
                          env={**os.environ, "IH_SLURM_DIR": str(state)}, capture_output=True,
                          text=True, timeout=60)


def _gone(proc: subprocess.Popen) -> bool:
    for _ in range(40):
        if proc.poll() is not None:
            return True
        time.sleep(0.05)
    return False


def test_stop_ends_the_recorded_daemons_and_nothing_else(tmp_path):
    state = tmp_path / "state"
    (state / "run").mkdir(parents=True)
    recorded, recorded_pid = _daemon(tmp_path, "a")
    other, _ = _daemon(tmp_path, "b")  # a process of the same name that start did not record
    stale = tmp_path / "stale.pid"
    stale.write_text(f"{other.pid}\n")  # a pid file whose process is not the named daemon
    (state / "run" / "started").write_text(f"sleep {recorded_pid}\nslurmd {stale}\n"
                                           f"munged {tmp_path / 'missing.pid'}\n")
    try:
        proc = _stop(state)
        assert proc.returncode == 0, proc.stderr
        assert _gone(recorded)
        assert other.poll() is None  # same name, not recorded: still running
        assert f"slurmd: pid {other.pid} from {stale} is not running slurmd" in proc.stderr
        assert "munged: no pid file" in proc.stderr
        assert not (state / "run" / "started").exists()
        assert "nothing was started" in _stop(state).stderr
    finally:
        for p in (recorded, other):
            p.kill()
            p.wait()

"""The configs and the tiny model ship inside the wheel; the app runs from an install."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_wheel_ships_configs_and_model_and_runs_installed(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-w", str(tmp_path / "dist"), str(ROOT)],
                           check=True, capture_output=True, text=True, cwd=tmp_path)
    assert "absent from the `packages` configuration" not in build.stdout + build.stderr
    wheel = next((tmp_path / "dist").glob("ih_sweep-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("ih_sweep/conf/config.yaml", "ih_sweep/conf/model/tiny.yaml",
                   "ih_sweep/pipeline/evaluate.py", "ih_sweep/conf/hydra/help/ih_sweep.yaml",
                   "ih_sweep/conf/hydra/launcher/resilient.yaml",
                   "ih_sweep/conf/experiment/notebook_replication.yaml",
                   "ih_sweep/assets/tiny/model.safetensors", "ih_sweep/assets/tiny/README.md",
                   "ih_sweep/assets/tiny/tokenizer.json"):
        assert needed in names, needed
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = tmp_path / "elsewhere"
    run.mkdir()
    proc = subprocess.run([sys.executable, "-m", "ih_sweep", "--cfg", "job"], cwd=run, env=env,
                          capture_output=True, text=True, check=True)
    assert "path: builtin:tiny" in proc.stdout
    probe = ("import ih_sweep.cli as l, ih_sweep.model.loading as m; "
             "print(l.config_dir()); print(m.resolve_path('builtin:tiny'))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=run, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert all(p.startswith(str(target)) for p in out), out

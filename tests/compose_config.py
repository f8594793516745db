"""Configs composed in-process with Hydra's compose API, and jobs run on them in-process
(the pattern of lightning-hydra-template's tests): no subprocess, no CLI parsing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from ih_sweep.cli import config_dir

CONF = Path(config_dir())


def compose(*overrides: str, return_hydra_config: bool = False) -> DictConfig:
    """conf/config.yaml with ``overrides``, as Hydra composes it for a job."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides),
                             return_hydra_config=return_hydra_config)


def run_job(out_dir: Path, *overrides: str) -> Any:
    """Run one job in this process (``launch.run``) with its folder at ``out_dir``; the
    score cache goes beside it unless ``paths.cache_dir`` is overridden."""
    from ih_sweep import cli as launch

    if not any(o.startswith("paths.cache_dir=") for o in overrides):
        overrides = (*overrides, f"paths.cache_dir={out_dir.parent / 'cache'}")
    cfg = compose(*overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return launch.run(cfg)


ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m ih_sweep ARGS`` in a subprocess (the real CLI) from ``cwd``; with
    ``check``, a non-zero exit raises with the tail of its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "ih_sweep", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc

"""The configs and the tiny model ship inside the wheel; the app runs from an install: the
wheel, and the default (lenient) editable install, each in a fresh venv, run a ``-m`` sweep (the
project's launcher plugin, found by Hydra's scan of the hydra_plugins namespace) from a folder
outside the project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_wheel_ships_configs_and_model_and_runs_installed(wheel, tmp_path):
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


SWEEP = ["-m", "n_heads=2", "condition=high,none", "data.n_stories=20", "mechanism.enabled=false"]


def fresh_venv(where: Path) -> Path:
    """A venv with nothing of its own, layered on the one running the tests: a .pth adds this
    interpreter's site-packages folders (in its order: the lowest-transformers venv's before
    the project venv's when scripts/test_lowest_transformers.sh runs the suite) as plain path
    entries AFTER the new venv's own, so torch and friends come from here (no download) but
    ih_sweep only from what is installed into the new venv (plain entries: those folders'
    own .pth files, the editable ih_sweep, are not run). Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; "
                          "print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    folders = [p for p in sys.path if Path(p).name == "site-packages"] or \
        [sysconfig.get_paths()["purelib"]]
    Path(own, "_project_venv.pth").write_text("".join(f"{p}\n" for p in folders))
    return python


def pip_install(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-compile", *args], check=True,
                   capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def sweeps_outside_the_project(python: Path, tmp_path: Path, origin: Path) -> None:
    """From a folder outside the project, ih_sweep imports from ``origin`` and a ``-m`` sweep
    (``python -m ih_sweep`` and the ``ih-sweep`` script) runs both jobs and writes a summary."""
    run = tmp_path / "elsewhere"
    run.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import ih_sweep; print(ih_sweep.__file__)"],
                           cwd=run, env=env, check=True, capture_output=True, text=True)
    assert Path(where.stdout.strip()).resolve().is_relative_to(origin.resolve()), where.stdout
    for name, command in (("module", [str(python), "-m", "ih_sweep"]),
                          ("script", [str(python.parent / "ih-sweep")])):
        sweep = tmp_path / f"sweep-{name}"
        proc = subprocess.run([*command, *SWEEP, f"hydra.sweep.dir={sweep}"], cwd=run, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
        assert (sweep / "summary.csv").is_file(), name
        assert len(list(sweep.glob("*/results.csv"))) == 2, name


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-w", str(dist), str(ROOT)],
                           check=True, capture_output=True, text=True, cwd=dist)
    assert "absent from the `packages` configuration" not in build.stdout + build.stderr
    return next(dist.glob("ih_sweep-*.whl"))


def test_wheel_in_a_fresh_venv_runs_a_sweep_from_anywhere(wheel, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    pip_install(python, str(wheel))
    sweeps_outside_the_project(python, tmp_path, tmp_path / "venv")


def test_default_editable_install_runs_a_sweep_from_anywhere(tmp_path):
    """``pip install -e .`` without options: setuptools' lenient editable mode (a finder, no
    path entry). Installed from a copy of the project, so nothing is written into it."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "outputs", "multirun",
        ".pytest_cache", ".ruff_cache", "shared"))
    python = fresh_venv(tmp_path / "venv")
    pip_install(python, "-e", str(source))
    sweeps_outside_the_project(python, tmp_path, source)

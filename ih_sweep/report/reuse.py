"""A summary reused when nothing it reads has changed, so that a rerun whose every job is
reused from the job store costs start-up plus a check, not the statistics and figures again.

The key (sha256) covers everything a summary reads, by content: each job's ``job.json``,
``results.csv`` and ``heads.csv`` under the sweep folder, its ``multirun.yaml``, the score
tables the jobs name (``scores_file``; by size and modification time), the jobs the
launcher reported as not finished, and the summary's own code (the sources of
:mod:`ih_sweep.report` and the package version). It is written beside the outputs as
``.summary.json`` with each output's size and modification time, only after a summary
that finished without a failed step or a job left out; a summary is reused only where the
key is the same and every output it wrote is there as it was written. Anything else (a
changed or added job, a touched score table, a deleted or edited ``summary.md``, a new
version) computes the summary again."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from ih_sweep.io_utils import write_json

log = logging.getLogger(__name__)

RECORD = ".summary.json"
READ = ("job.json", "results.csv", "heads.csv")  # what a summary reads of each job
OUTPUTS = ("summary.csv", "summary.md", "summary.tex", "strata.csv", "robustness.csv",
           "icl_curve.csv")  # and every .png the summary wrote into the sweep folder


LIBRARIES = ("ih_sweep", "pandas", "numpy", "scipy", "statsmodels", "matplotlib")


def _code_digest() -> str:
    """The sources of the ih_sweep package (every module; ~10 ms) and the versions of the
    libraries a summary computes and draws with."""
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    for package in LIBRARIES:
        try:
            h.update(f"{package}={version(package)};".encode())
        except PackageNotFoundError:
            h.update(f"{package}=none;".encode())
    root = Path(__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


def summary_key(sweep_dir: Path, score_files: list[str],
                not_finished: list[tuple[str, str]]) -> str:
    """The content key of a summary of ``sweep_dir`` (see the module docstring)."""
    h = hashlib.sha256(_code_digest().encode())
    for name in READ:
        for path in sorted(sweep_dir.rglob(name)):
            h.update(str(path.relative_to(sweep_dir)).encode() + path.read_bytes())
    multirun = sweep_dir / "multirun.yaml"
    if multirun.is_file():
        h.update(multirun.read_bytes())
    for name in sorted(set(score_files)):
        path = Path(name)
        stat = path.stat() if path.is_file() else None
        h.update(json.dumps([name, stat and [stat.st_size, stat.st_mtime_ns]]).encode())
    h.update(json.dumps(sorted(not_finished)).encode())
    return h.hexdigest()


def _outputs(sweep_dir: Path) -> dict[str, list[int]]:
    files = [sweep_dir / n for n in OUTPUTS] + sorted(sweep_dir.glob("*.png"))
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.is_file()}


def remember(sweep_dir: Path, key: str) -> None:
    """Record ``key`` and the outputs now in ``sweep_dir`` (after a complete summary)."""
    write_json(sweep_dir / RECORD, {"key": key, "outputs": _outputs(sweep_dir)})


def reusable(sweep_dir: Path, key: str) -> bool:
    """Whether the summary in ``sweep_dir`` was made for ``key`` and its outputs are as
    it wrote them."""
    try:
        saved = json.loads((sweep_dir / RECORD).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and saved.get("key") == key and \
        bool(saved.get("outputs")) and saved.get("outputs") == _outputs(sweep_dir)

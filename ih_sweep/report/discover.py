"""Finding a sweep's jobs: the job folders under a sweep folder, sorted into finished
evaluate jobs (read through :mod:`ih_sweep.pipeline.records`, the definitions the jobs write
with), scan parts, several-draw parents and folders left out with the reason; and the jobs
the sweep's ``multirun.yaml`` says were launched, so that a job that left no folder is
reported too."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ih_sweep.pipeline.records import (
    EvaluationRecord,
    RecordError,
    ScanRecord,
    SeedsRecord,
    checksum_problem,
    read_record,
)

log = logging.getLogger(__name__)

DEFAULT_SUBDIR = "${path_safe:${hydra.job.override_dirname}}"  # conf/config.yaml's
MISSING_FOLDER = "multirun.yaml lists this job, but its folder is missing (never ran, or deleted)"


@dataclass
class FinishedJob:
    """An evaluate job's folder, record (job.json) and results (results.csv, one row per
    item)."""

    path: Path
    record: EvaluationRecord
    results: pd.DataFrame


@dataclass
class SweepJobs:
    """What :func:`find_jobs` found in a sweep folder."""

    jobs: list[FinishedJob] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (folder, why)
    scan_parts: list[Path] = field(default_factory=list)  # job=scan folders
    seed_parents: list[Path] = field(default_factory=list)  # several-draw jobs' folders


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs a multirun of ``overrides`` launches, each as its list of ``key=value``
    overrides: the cartesian product of the sweeps' values, one value for a plain override,
    a key given twice keeping its last place's values (what Hydra's basic sweeper does).
    Raises ``ValueError`` for a sweep the basic sweeper cannot expand (a range without
    bounds, an interval) and Hydra's ``OverrideParseException`` for text it cannot parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    values: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                raise ValueError(f"the basic sweeper does not expand {override.input_line}")
            values[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
        else:
            values[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*values.values())]


def expected_jobs(sweep_dir: Path) -> tuple[int, list[str]] | None:
    """(how many jobs the sweep's ``multirun.yaml`` launched, their folder names where the
    job folders have the default names), or None without a readable multirun.yaml. The jobs
    are expanded from its overrides by :func:`sweep_jobs`, the folder names made by
    :func:`ih_sweep.config.schema.folder_name` as the jobs name their folders."""
    from omegaconf import OmegaConf

    from ih_sweep.config.hydra import register
    from ih_sweep.config.identity import folder_name, speed_keys

    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    register()
    try:
        cfg = OmegaConf.load(path)
        args = list(cfg.hydra.overrides.task)
        params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
        given = {a.split("=", 1)[0].lstrip("+~") for a in args}
        args += [f"{k}={v}" for k, v in params.items() if k not in given]
        jobs = sweep_jobs(args)
    except Exception as err:  # a multirun.yaml of another tool or version
        log.warning("cannot read the jobs of %s: %s", path, err)
        return None
    if OmegaConf.to_container(cfg.hydra.sweep, resolve=False).get("subdir") != DEFAULT_SUBDIR:
        return len(jobs), []  # folders named otherwise: only the count can be checked
    exclude = set(speed_keys())
    names = []
    for job in jobs:
        lines = sorted(o for o in job if o.split("=", 1)[0].lstrip("+~") not in exclude)
        names.append(folder_name(",".join(lines)))
    return len(jobs), names


def missing_jobs(sweep_dir: Path, present: set[str], count: bool = True
                 ) -> list[tuple[str, str]]:
    """(folder, why) for each job the sweep's multirun.yaml lists (:func:`expected_jobs`)
    whose folder is not among ``present`` (folders relative to ``sweep_dir``); ``count``:
    where the folder names are not the default ones, one entry for the sweep when it lists
    more jobs than ``present`` has. Empty without a readable multirun.yaml."""
    expected = expected_jobs(sweep_dir)
    if expected is None:
        return []
    total, names = expected
    out = [(n, MISSING_FOLDER) for n in names if n not in present]
    if count and not names and total > len(present):
        out.append((str(sweep_dir), f"multirun.yaml lists {total} jobs, "
                                    f"{len(present)} folders were found"))
    return out


def in_job_store(folder: Path) -> bool:
    """Whether ``folder`` is a finished job's copy in a job store
    (``<paths.cache_dir>/jobs/<config hash>/``, :func:`ih_sweep.pipeline.records.store_dir`),
    e.g. a cache kept inside the sweep folder: not a job of the sweep (its job folder is)."""
    if folder.parent.name != "jobs" or (folder / ".hydra").exists():
        return False
    try:
        return read_record(folder).config_hash == folder.name
    except RecordError:
        return False


def find_jobs(sweep_dir: Path) -> SweepJobs:
    """Find job folders (those with a .hydra/ or job.json) and sort good from broken (an
    evaluation whose job.json or results.csv is not what the job wrote is broken:
    :func:`ih_sweep.pipeline.records.checksum_problem`). A
    several-draw job's folder (``control_seeds=K``) lists its draws, each a job folder
    of its own below it: it is kept apart (:attr:`SweepJobs.seed_parents`), and reported
    only when a listed draw's folder is missing. A job store's copies (a cache inside the
    sweep folder: :func:`in_job_store`) are not jobs of the sweep."""
    out = SweepJobs()
    candidates = sorted({p.parent for p in sweep_dir.rglob("job.json")}
                        | {p.parent.parent for p in sweep_dir.rglob(".hydra/config.yaml")})
    candidates = [c for c in candidates if (c != sweep_dir or (c / "job.json").exists())
                  and not in_job_store(c)]
    for folder in candidates:
        rel = str(folder.relative_to(sweep_dir)) or "."
        if not (folder / "job.json").is_file():
            out.problems.append((rel, "no job.json: the job failed or has not finished"))
            continue
        try:
            record = read_record(folder)
        except RecordError as err:
            out.problems.append((rel, f"unreadable job.json ({err})"))
            continue
        if record.status != "complete":
            out.problems.append((rel, f"status {record.status!r}"))
            continue
        if isinstance(record, ScanRecord):
            if (folder / "scan.csv").is_file():
                out.scan_parts.append(folder)
            else:
                out.problems.append((rel, "scan job without scan.csv"))
            continue
        if isinstance(record, SeedsRecord):  # its draws are job folders of their own
            gone = [f for f in record.seed_folders if not (folder / f / "job.json").is_file()]
            if gone:
                out.problems.append((rel, f"the draw folder(s) {', '.join(gone)} of this "
                                          "several-draw job are missing"))
            else:
                out.seed_parents.append(folder)
            continue
        damage = checksum_problem(folder, record)  # job.json or results.csv edited
        if damage:
            out.problems.append((rel, damage))
            continue
        try:
            results = pd.read_csv(folder / "results.csv")
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            out.problems.append((rel, f"results.csv unreadable ({err})"))
            continue
        if len(results) != record.n_items:
            out.problems.append((rel, f"results.csv has {len(results)} rows, job.json says "
                                      f"{record.n_items}"))
            continue
        out.jobs.append(FinishedJob(folder, record, results))
    return out

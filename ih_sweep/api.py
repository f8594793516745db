"""The Python API: run a job or a sweep from a notebook with the command line's overrides, and
get pandas DataFrames back.

    import ih_sweep.api as ih
    sweep = ih.run("n_heads=4,8,16", "condition=high,low,none")   # the main sweep
    sweep.table()            # accuracy % [95% CI], one row per N, one column per condition
    sweep.summary            # summary.csv (every column: ih_sweep.report.summarize)
    sweep.jobs[0].results    # one job's results.csv (a row per item)
    ih.load_sweep("outputs/multirun/<time>_<hex>")   # a finished sweep, CLI's or API's

It is the CLI's pipeline, not a second one: the same Hydra config (conf/, composed with
Hydra's compose API and the same schema and rules), the same checks of every job before any
runs, the same recipe per job (:func:`ih_sweep.cli.run`), the same job store (a job already
finished for the same inputs is reused, also one the CLI ran) and the same summary
(:func:`ih_sweep.report.summarize.summarize`), so the same overrides give byte-equal
results.csv. A sweep is what Hydra's basic sweeper would expand (comma lists, ``range()``,
``choice()``): its jobs run one after another in this process, into
``<hydra.sweep.dir>/<overrides>`` as the CLI names them.

Errors are exceptions, never an exit: a mistake in the overrides or inputs raises
:class:`~ih_sweep.config.errors.UserError` (a :class:`ValueError`) whose message is the
CLI's one line, before any job runs; a sweep some of whose jobs fail raises
:class:`SweepFailed` after the others ran, carrying the :class:`Sweep` of what finished.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ih_sweep.config.errors import ConfigError, UserError, one_line

log = logging.getLogger("ih_sweep")


class SweepFailed(RuntimeError):
    """Some jobs of a sweep failed (each named with its one-line reason in the message);
    ``sweep``: the :class:`Sweep` of the jobs that finished (summarized where any did)."""

    def __init__(self, message: str, sweep: Sweep):
        super().__init__(message)
        self.sweep = sweep


@dataclass
class Job:
    """A finished evaluate job's folder and what it wrote: ``record`` (job.json as
    :class:`~ih_sweep.pipeline.records.EvaluationRecord`), ``results`` (results.csv, one row
    per evaluated item, columns :data:`~ih_sweep.pipeline.records.RESULT_COLUMNS`) and
    ``heads`` (heads.csv, one row per ablated head: layer, head, score, rank_by,
    output_norm; empty for ``condition=none``)."""

    folder: Path
    record: Any
    results: pd.DataFrame
    heads: pd.DataFrame

    @property
    def accuracy(self) -> float:
        """Share of items answered correctly (0-1)."""
        return float(self.record.accuracy)


@dataclass
class Sweep:
    """A sweep folder's jobs and summary: ``summary`` is summary.csv (one row per distinct
    job of each group, its columns documented in :mod:`ih_sweep.report.summarize`; empty
    where nothing could be summarized), ``jobs`` every finished evaluate job found in it
    (a several-draw job's draws each on their own), ``problems`` (folder, why) for the
    folders left out."""

    folder: Path
    jobs: list[Job] = field(default_factory=list)
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)
    problems: list[tuple[str, str]] = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        """Accuracy % [95% Wilson CI] with N as rows and the conditions as columns (random:
        its draws' median accuracy and 2.5-97.5% band), one table per sweep of one group
        (a ``group`` column is added where the summary has several): what the README's
        result table shows."""
        return accuracy_table(self.summary)


def accuracy_table(summary: pd.DataFrame) -> pd.DataFrame:
    """:meth:`Sweep.table` of a summary.csv DataFrame."""
    if summary.empty:
        return pd.DataFrame()
    rows = []
    for group, g in summary.groupby("group", sort=False):
        none = g[g.condition == "none"]
        unablated = _cell(none.iloc[0]) if len(none) else ""
        for n, at_n in g[g.condition != "none"].groupby("n_heads", sort=True):
            row: dict[str, Any] = {"group": group, "N": int(n)}
            for cond, part in at_n.groupby("condition", sort=False):
                if cond == "random":
                    acc = 100 * part.accuracy
                    row["random"] = (f"{acc.median():.1f} [{acc.quantile(0.025):.1f}, "
                                     f"{acc.quantile(0.975):.1f}] ({len(part)} draws)")
                else:
                    row[cond] = _cell(part.iloc[0])
            row["none"] = unablated
            rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    order = ["group", "N"] + [c for c in ("high", "low", "random", "none") if c in table] + \
        [c for c in table.columns if c not in ("group", "N", "high", "low", "random", "none")]
    table = table[order].fillna("")
    if table.group.nunique() == 1:
        table = table.drop(columns="group")
    return table.reset_index(drop=True)


def _cell(row: pd.Series) -> str:
    return (f"{100 * row.accuracy:.1f} [{100 * row.ci_low:.1f}, "
            f"{100 * row.ci_high:.1f}]")


# --------------------------------------------------------------------------- loading
def load_job(folder: str | Path) -> Job:
    """A finished evaluate job's folder (job.json, results.csv, heads.csv). Raises
    :class:`~ih_sweep.config.errors.UserError` where it is not one (one line: the
    folder and why)."""
    from ih_sweep.pipeline.records import RecordError, read_record

    folder = Path(folder)
    try:
        record = read_record(folder)
        results = pd.read_csv(folder / "results.csv")
    except (RecordError, OSError, ValueError) as err:
        raise UserError(f"{folder}: not a finished job ({one_line(err)})") from None
    heads_file = folder / "heads.csv"
    heads = pd.read_csv(heads_file) if heads_file.is_file() and heads_file.stat().st_size \
        else pd.DataFrame()
    return Job(folder, record, results, heads)


def load_sweep(folder: str | Path, summarize: bool = False) -> Sweep:
    """A sweep folder written by the CLI or by :func:`run`: its jobs and its summary.csv
    (``summarize=True``, or no summary.csv there: made now, as the CLI makes it). Raises
    :class:`~ih_sweep.config.errors.UserError` for a folder that is not there or holds no
    finished job."""
    from ih_sweep.report.discover import find_jobs
    from ih_sweep.report.errors import SummaryError, SummaryIncomplete
    from ih_sweep.report.summarize import summarize as make_summary

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    found = find_jobs(folder)
    jobs = _jobs(found)
    summary_file = folder / "summary.csv"
    summary = pd.DataFrame()
    if summarize or not summary_file.is_file():
        try:
            summary = make_summary(folder)
        except SummaryIncomplete as err:
            summary = err.table if err.table is not None else pd.DataFrame()
        except SummaryError as err:
            raise UserError(one_line(err)) from None
    else:
        summary = pd.read_csv(summary_file)
    return Sweep(folder, jobs, summary, list(found.problems))


def _heads(folder: Path) -> pd.DataFrame:
    path = folder / "heads.csv"
    return pd.read_csv(path) if path.is_file() and path.stat().st_size else pd.DataFrame()


# --------------------------------------------------------------------------- running
def expand(overrides: Sequence[str]) -> list[list[str]]:
    """The jobs' override lists of a sweep, as Hydra's basic sweeper expands them (comma
    lists, ``range()``, ``choice()``: their product, in Hydra's order); one list for
    overrides without a sweep. Raises :class:`~ih_sweep.config.errors.ConfigError` (one
    line) for an override Hydra cannot parse."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from ih_sweep.config.hydra_errors import refusal

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        return [list(job) for job in BasicSweeper.split_arguments(parsed, None)[0]]
    except HydraException as err:
        raise ConfigError(refusal(err)) from None


def is_sweep(overrides: Sequence[str]) -> bool:
    """Whether any of ``overrides`` is a sweep in Hydra's grammar (``a=1,2``, ``range()``,
    ``choice()``, ``glob()``; a list value such as ``eval.stop=[x,y]`` is not one)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from ih_sweep.config.hydra_errors import refusal

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise ConfigError(refusal(err)) from None
    return any(o.is_sweep_override() for o in parsed)


def compose(overrides: Sequence[str]) -> Any:
    """conf/config.yaml with ``overrides`` (one job's, no sweep), as Hydra composes it for
    a job of the CLI, with its ``hydra`` node. Raises
    :class:`~ih_sweep.config.errors.ConfigError` with Hydra's refusal in one line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ih_sweep.cli import config_dir
    from ih_sweep.config.hydra import register
    from ih_sweep.config.hydra_errors import refusal

    register()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3",
                                   job_name="ih_sweep"):
            return hydra_compose(config_name="config", overrides=list(overrides),
                                 return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(refusal(err)) from None


def run(*overrides: str, multirun: bool | None = None, summarize: bool = True
        ) -> Job | Sweep:
    """Run the CLI's command ``ih-sweep [-m] OVERRIDES`` in this process: one job (no sweep
    in ``overrides`` and ``multirun`` not True) returns its :class:`Job`; a sweep (a comma
    list, ``range()`` or ``choice()`` in an override, or ``multirun=True``) runs every job,
    then (``summarize``) writes the summary, and returns the :class:`Sweep`.

    Every job's config is composed and checked before any job runs (the first mistake
    raises :class:`~ih_sweep.config.errors.UserError`, one line naming the job in a sweep);
    a job already finished for the same inputs is reused from the job store, as by the
    CLI. Folders: ``hydra.run.dir`` for one job, ``hydra.sweep.dir/<overrides>`` for a
    sweep's (override them as on the command line). Only ``job=evaluate`` returns a
    :class:`Job`; other jobs (score, scan, train_tiny) return what their recipe returns."""
    jobs = expand(overrides)
    sweep = multirun if multirun is not None else is_sweep(overrides)
    configs = []
    for job_overrides in jobs:
        cfg = compose(job_overrides)
        _checked(cfg, job_overrides if sweep else None)
        configs.append((job_overrides, cfg))
    if not sweep:
        _, cfg = configs[0]
        folder = Path(str(cfg.hydra.run.dir))
        return _as_job(_run_one(cfg, folder, job_overrides=list(overrides)), folder)
    sweep_dir = Path(str(configs[0][1].hydra.sweep.dir))
    failures = []
    for job_overrides, cfg in configs:
        folder = sweep_dir / str(cfg.hydra.sweep.subdir)
        try:
            _run_one(cfg, folder, job_overrides)
        except UserError as err:
            failures.append((" ".join(job_overrides), f"{err.kind} error: {err}"))
            log.error("%s: %s", " ".join(job_overrides), failures[-1][1])
    result = load_sweep(sweep_dir, summarize=summarize) if summarize else \
        Sweep(sweep_dir, load_sweep_jobs(sweep_dir))
    if failures:
        listed = "; ".join(f"{job}: {why}" for job, why in failures)
        raise SweepFailed(f"{len(failures)} of {len(configs)} jobs failed: {listed}", result)
    return result


def load_sweep_jobs(folder: Path) -> list[Job]:
    """The finished evaluate jobs of a sweep folder, without a summary."""
    from ih_sweep.report.discover import find_jobs

    return _jobs(find_jobs(folder))


def _jobs(found: Any) -> list[Job]:
    """The :class:`Job` of each finished job :func:`ih_sweep.report.discover.find_jobs`
    found."""
    return [Job(j.path, j.record, j.results, _heads(j.path)) for j in found.jobs]


def _checked(cfg: Any, job: Sequence[str] | None) -> Any:
    """The job's typed config, checked as the CLI checks it before any job runs
    (:func:`ih_sweep.pipeline.preflight.check_job`); a refusal names the job in a sweep."""
    from omegaconf import open_dict

    from ih_sweep.pipeline.preflight import check_job

    bare = cfg.copy()
    with open_dict(bare):
        del bare["hydra"]
    try:
        return check_job(bare)
    except UserError as err:
        if job is None:
            raise
        raise type(err)(f"{err} (job {' '.join(job)})") from None


def _run_one(cfg: Any, folder: Path, job_overrides: Sequence[str]) -> Any:
    """One job into ``folder`` as Hydra's launcher runs it: its ``.hydra/`` files
    (config.yaml, hydra.yaml, overrides.yaml) then :func:`ih_sweep.cli.run` with the job's
    HydraConfig set."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from ih_sweep.cli import run as run_recipe
    from ih_sweep.io_utils import write_text

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(folder.resolve())
    hydra_node = cfg.hydra
    task = cfg.copy()
    with open_dict(task):
        del task["hydra"]
    saved = folder / ".hydra"
    saved.mkdir(parents=True, exist_ok=True)
    write_text(saved / "config.yaml", OmegaConf.to_yaml(task))
    write_text(saved / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_node}))
    write_text(saved / "overrides.yaml", OmegaConf.to_yaml(list(job_overrides)))
    HydraConfig.instance().set_config(cfg)
    return run_recipe(task)


def _as_job(result: Any, folder: Path) -> Any:
    from ih_sweep.pipeline.records import EvaluationRecord

    if isinstance(result, EvaluationRecord):
        return load_job(folder)
    return result

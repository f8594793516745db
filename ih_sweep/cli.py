"""Hydra entry point (``ih-sweep`` / ``python -m ih_sweep``): compose the config, turn it
into the typed :class:`~ih_sweep.config.schema.Config`, run the job's recipe
(:mod:`ih_sweep.pipeline`),
and summarize a multirun when it ends (:class:`SummarizeCallback`).

A user mistake ends with exit status 2: a value the schema does not allow is refused by
Hydra while it composes (its own message); any other (a rule of
:func:`ih_sweep.config.rules.check`, a data or score file, a model path, a device) ends in one
line on stderr, ``ih_sweep: <kind> error: ...`` (:class:`~ih_sweep.config.errors.UserError`).
Heavy imports (torch, transformers) stay inside the jobs, so config errors come first.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from ih_sweep.config.errors import UserError, one_line
from ih_sweep.config.hydra import register
from ih_sweep.config.schema import Job
from ih_sweep.model.runtime import keep_freed_memory
from ih_sweep.pipeline.preflight import check_job

log = logging.getLogger("ih_sweep")
register()  # the schema in Hydra's ConfigStore, before @hydra.main composes


def config_dir() -> str:
    """conf/ at the repository root (source checkout) or ih_sweep/conf (installed wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError("ih_sweep's conf/ directory is missing from the installation")


def output_dir() -> Path:
    """This job's folder: Hydra's output_dir, or the working directory outside Hydra."""
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path.cwd()


def run(cfg: DictConfig) -> Any:
    """Check the config, then run ``config.job`` into this job's folder."""
    from ih_sweep.pipeline import evaluate, scan, score, train_tiny

    config = check_job(cfg)
    keep_freed_memory()  # each job's process: no page faults on every new activation
    out_dir = output_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = {Job.evaluate: evaluate.run, Job.score: score.run, Job.scan: scan.run,
              Job.train_tiny: train_tiny.run}[config.job]
    return recipe(config, out_dir)


_started = False  # set once Hydra has composed the config and a job or launcher started


def mark_started() -> None:
    """From here on an exit status 1 is a failure of the work, not of the command line."""
    global _started
    _started = True


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> Any:
    mark_started()
    try:
        return run(cfg)
    except UserError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # one job of a sweep: the launcher reports it among the sweep's failures
        print(f"ih_sweep: {err.kind} error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def cli() -> None:
    """The console script: :func:`main`, with Hydra's own refusals of the command line (an
    override it cannot parse or merge into the schema, an unknown config option: Hydra
    exits 1 before any job starts) reported as what they are, a user's mistake: exit 2."""
    try:
        main()
    except SystemExit as exit_:
        if exit_.code == 1 and not _started:
            raise SystemExit(2) from None
        raise


def wants_summary(config: Any) -> bool:
    """Whether a multirun of ``config`` ends in a summary: ``summarize`` is on and its jobs
    evaluate or scan (score and train_tiny jobs leave nothing to summarize)."""
    return bool(config.get("summarize", True)) and \
        str(config.get("job", "evaluate")) in ("evaluate", "scan")


class SummarizeCallback(Callback):
    """Summarize the sweep folder when a multirun ends (also after SLURM jobs return). A
    summary that fails, or leaves jobs out, ends the command with exit status 1 and one
    line on stderr saying what (after printing whatever table it made)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not wants_summary(config):
            return
        from ih_sweep.report.errors import SummaryIncomplete
        from ih_sweep.report.render import console_report
        from ih_sweep.report.summarize import summarize

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            df = summarize(sweep_dir)
        except SummaryIncomplete as err:
            if err.table is not None and not err.table.empty:
                print(console_report(err.table, sweep_dir), flush=True)
            summary_failed(str(err))
        except Exception as err:  # SystemExit passes Hydra's callback guard; this would not
            why = one_line(err)
            summary_failed(f"the summary of {sweep_dir} failed: {type(err).__name__}"
                           + (f": {why}" if why else ""))
        if not df.empty:
            print(console_report(df, sweep_dir), flush=True)


def summary_failed(message: str) -> None:
    """End the command with ``message`` as one line on stderr and exit status 1 (the jobs'
    results stay where they are)."""
    log.error("%s", message)
    print(f"ih_sweep: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)

"""Hydra entry point (``ih-sweep`` / ``python -m ih_sweep``): compose the config, turn it
into the typed :class:`~ih_sweep.config.schema.Config`, run the job's recipe
(:mod:`ih_sweep.pipeline`),
and summarize a multirun when it ends (:class:`SummarizeCallback`).

A user mistake ends in one line on stderr, ``ih_sweep: <kind> error: ...``, and exit
status 2: a rule of :func:`ih_sweep.config.rules.check`, a data or score file, a model path,
a device (:class:`~ih_sweep.config.errors.UserError`); Hydra's own refusals while it composes
(an override it cannot parse, a value the schema's type refuses, an unknown key or config
group option: :func:`~ih_sweep.config.hydra_errors.refusal`, the full text with
``HYDRA_FULL_ERROR=1``); an output folder that cannot be made (:class:`OutputFolderCallback`).
A refused command leaves no run or sweep folder it made. Heavy imports (torch,
transformers) stay inside the jobs, so config errors come first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hydra
import hydra._internal.utils as hydra_utils
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ih_sweep.config.errors import UserError, one_line
from ih_sweep.config.hydra import register
from ih_sweep.config.hydra_errors import refusal
from ih_sweep.config.schema import Job
from ih_sweep.io_utils import WriteError
from ih_sweep.model.runtime import freeze_for_exit, keep_freed_memory, this_process_is_the_command
from ih_sweep.pipeline.model_facts import keep_facts
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
    """Check the config, then run ``config.job`` into this job's folder (the recipes,
    which import pandas and torch, are imported after the check: a refusal is quick)."""
    config = check_job(cfg)
    keep_facts()  # what the checks found about the model folder, for later commands
    from ih_sweep.pipeline import evaluate, scan, score, train_tiny

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
    try:  # an interpolation to nothing (n_heads='${foo}'): Hydra composed it unresolved
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        if full_error_wanted():
            raise
        refuse(f"config error: {refusal(err)}")
    mark_started()
    try:
        return run(cfg)
    except UserError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # one job of a sweep: the launcher reports it among the sweep's failures
        refuse(f"{err.kind} error: {err}")
    except WriteError as err:  # a full disk, a read-only folder: not a mistake in the command
        if HydraConfig.get().mode == RunMode.MULTIRUN or full_error_wanted():
            raise  # the launcher fails that job alone, in one line, and runs the others
        print(f"ih_sweep: write error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def refuse(message: str) -> None:
    """End the command with ``ih_sweep: <message>`` as one line on stderr and exit status 2
    (a user's mistake), removing the output folders it made that hold only Hydra's files
    (:func:`remove_unused_output_folders`)."""
    remove_unused_output_folders()
    print(f"ih_sweep: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def full_error_wanted() -> bool:
    """Whether the user asked for Hydra's full text (``HYDRA_FULL_ERROR=1``)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def group_options(group: str) -> list[str]:
    """The options of config group ``group`` (``model``, ``hydra/launcher``), from Hydra's
    config loader of this command."""
    return GlobalHydra.instance().config_loader().get_group_options(group)


def report_in_one_line(func: Callable[[], Any]) -> Any:
    """Run ``func`` (Hydra composing, or a whole run or sweep); a refusal of Hydra's before
    any job started (:func:`~ih_sweep.config.hydra_errors.refusal`) ends the command in one
    line, exit status 2; anything else propagates to Hydra's own report."""
    try:
        return func()
    except (HydraException, OmegaConfBaseException) as err:
        message = None if _started or full_error_wanted() else refusal(err, group_options)
        if message is None:
            raise
        refuse(f"config error: {message}")
    except OSError as err:  # Hydra saving its files (.hydra/, multirun.yaml) on a full disk
        if full_error_wanted():
            raise
        if not isinstance(err, WriteError):
            where = f" {err.filename}" if err.filename else \
                f" Hydra's files (.hydra/, multirun.yaml) in {_output_folder[-1]}" \
                if _output_folder else " Hydra's files (.hydra/, multirun.yaml)"
            err = WriteError(err.errno, f"cannot write{where} ({err.strerror or err})")
        print(f"ih_sweep: write error: {err}", file=sys.stderr, flush=True)
        mark_started()  # exit status 1: the file system's refusal, not the command's mistake
        raise SystemExit(1) from None


@contextlib.contextmanager
def hydra_refusals_in_one_line() -> Iterator[None]:
    """While Hydra runs the command, each of its ``run_and_report`` calls (the one place
    where it prints an error in several lines and exits 1) first passes through
    :func:`report_in_one_line`. Hydra's reporting stays in charge of everything else, so
    bugs keep their traceback and ``HYDRA_FULL_ERROR=1`` its meaning."""
    hydra_report = hydra_utils.run_and_report

    def run_and_report(func: Callable[[], Any]) -> Any:
        return hydra_report(lambda: report_in_one_line(func))

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        hydra_utils.run_and_report = hydra_report


@contextlib.contextmanager
def config_store_shared() -> Iterator[None]:
    """While Hydra runs the command, a deep copy of its ConfigStore (a singleton) is the
    store itself: Hydra copies its config repository, the store with every schema node in
    it (~10 ms), for each composition and ~100 times for ``--help`` (listing the config
    groups). Hydra's development branch does the same (its structured config source looks
    the store up on each load: facebookresearch/hydra#2928). Nothing is changed through a
    copy (a load deep-copies the node it returns), so what is composed is the same."""
    from hydra.core.config_store import ConfigStore

    if "__deepcopy__" in vars(ConfigStore):  # a Hydra that decides this itself
        yield
        return
    ConfigStore.__deepcopy__ = lambda self, memo: self  # type: ignore[attr-defined]
    try:
        yield
    finally:
        del ConfigStore.__deepcopy__  # type: ignore[attr-defined]


def keyless_override(args: list[str]) -> str | None:
    """The first command-line argument that is an override without a key (``=4``), which
    Hydra refuses with a traceback; None when there is none."""
    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-"):
            continue
        try:
            override = parser.parse_override(arg)
        except Exception:  # not an override (a flag's value), or one Hydra reports itself
            continue
        if not override.key_or_group:
            return arg
    return None


class _ArgumentError(Exception):
    pass


def command_line_mistake(args: list[str]) -> str | None:
    """What Hydra's own argument parser (``hydra._internal.utils.get_args_parser``, which
    prints its usage, 8 lines, before its error) would refuse in ``args``, as one sentence;
    None when it would accept them. Flags that print and exit (``--version``) are left
    to Hydra."""
    from hydra._internal.utils import get_args_parser

    if "--version" in args:
        return None
    parser = get_args_parser()

    def error(message: str) -> None:
        raise _ArgumentError(message)

    parser.error = error  # type: ignore[method-assign]
    try:
        known, extra = parser.parse_known_args(args)
    except _ArgumentError as err:
        text = str(err)
        return text if "choose from" in text else \
            f"{text}; allowed: the flags --hydra-help lists"
    # hydra._internal.utils._run_hydra raises a ValueError (a traceback) for more than one
    commands = [flag for flag, given in (
        ("--run", known.run), ("--multirun", known.multirun), ("--cfg", known.cfg is not None),
        ("--info", known.info is not None), ("--shell-completion", known.shell_completion))
        if given]
    if len(commands) > 1:
        return (f"{' and '.join(commands)} given together; allowed: one of --run, --multirun, "
                "--cfg, --info, --shell-completion")
    if not extra:
        return None
    if any("=" in a and not a.startswith("-") for a in extra):
        return (f"unrecognized arguments: {' '.join(extra)}; flags such as -m go before the "
                "overrides, e.g. ih-sweep -m n_heads=4,8 condition=high,low")
    return f"unrecognized arguments: {' '.join(extra)}; allowed: the flags --hydra-help lists"


def command() -> None:
    """The console script ``ih-sweep`` and ``python -m ih_sweep``: :func:`cli` in a process
    that is the command's own, so that what it keeps until it exits is frozen out of the
    garbage collector's walks (:func:`ih_sweep.model.runtime.long_lived`)."""
    this_process_is_the_command()
    try:
        cli()
    finally:
        freeze_for_exit()


def cli() -> None:
    """The command: :func:`main`, with Hydra's own refusals of the command line (an
    override it cannot parse or merge into the schema, an unknown key or config option:
    Hydra exits 1 before any job starts) reported as what they are, a user's mistake, in
    one line: exit 2."""
    global _started
    _started = False
    _made.clear()
    _output_folder.clear()
    bad = keyless_override(sys.argv[1:])
    if bad is not None and not full_error_wanted():
        refuse(f"config error: {bad}: an override needs a key before '='; write key=value, "
               "e.g. n_heads=4")
    mistake = command_line_mistake(sys.argv[1:])
    if mistake is not None and not full_error_wanted():
        refuse(f"config error: {mistake}")
    try:
        with hydra_refusals_in_one_line(), config_store_shared():
            main()
    except SystemExit as exit_:
        if exit_.code == 1 and not _started:
            remove_unused_output_folders()
            raise SystemExit(2) from None
        raise


# --- output folders ------------------------------------------------------------------

_made: list[Path] = []  # the folders this command made for its run or sweep, outermost first
_output_folder: list[str] = []  # "<folder> (<key>)" of this command's run or sweep
_log_name: list[str] = []  # the job log Hydra writes into a run folder (<hydra.job.name>.log)
HYDRA_FILES = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml",
               "multirun.yaml")


def prepare_output_folder(key: str, config: DictConfig) -> Path:
    """Make the folder ``config``'s ``key`` (``hydra.run.dir`` or ``hydra.sweep.dir``)
    names and check that files can be written in it, before Hydra writes anything there;
    remember each folder made (for :func:`remove_unused_output_folders`). Refuses (one
    line, exit 2) an empty value (the working directory itself), a path through an
    existing file, and a folder that cannot be made or written."""
    try:
        value = OmegaConf.select(config, key)
    except OmegaConfBaseException as err:
        refuse(f"config error: {key}: {one_line(getattr(err, 'msg', None) or err)}")
    if value is None or not str(value).strip():
        what = "run" if key == "hydra.run.dir" else "sweep"
        refuse(f"config error: {key}={value if value is None else repr(str(value))} is not "
               f"allowed; allowed: a folder for the {what}'s files, e.g. {key}=outputs/"
               f"{what}s/my_{what} (an empty one would be the working directory itself)")
    folder = Path(str(value))
    missing = [p for p in (folder, *folder.parents) if not p.exists() and not p.is_symlink()]
    on_file = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()),
                   None)
    if on_file is not None:
        refuse(f"config error: {key}={value}: {on_file} is a file, not a folder; give a "
               "folder (a new one, or one of your runs)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _made.extend(p for p in reversed(missing) if p.is_dir())
        first = missing[-1] if missing else folder
        parent = first.parent.resolve()
        where = (f"the working directory {parent}" if parent == Path.cwd().resolve()
                 else str(parent))
        refuse(f"config error: {key}={value}: cannot make the folder {first}: "
               f"{err.strerror or type(err).__name__} in {where}; give a folder you can "
               "write, or run from one")
    _made.extend(reversed(missing))
    _output_folder[:] = [f"{folder} ({key})"]
    _log_name[:] = [f"{OmegaConf.select(config, 'hydra.job.name', default='ih_sweep')}.log"]
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".ih_sweep-write-test-"):
            pass
    except OSError as err:
        refuse(f"config error: {key}={value}: cannot write in {folder}: "
               f"{err.strerror or type(err).__name__}; give a folder you can write")
    return folder


def remove_unused_output_folders() -> None:
    """Remove the folders this command made (:func:`prepare_output_folder`) that hold
    nothing but Hydra's own files (``.hydra/``, ``multirun.yaml``, the job log), innermost
    first: a refused command leaves no empty run or sweep folder. A folder that existed
    before, or holds any other file, is kept."""
    for folder in reversed(_made):
        for name in (*HYDRA_FILES, *_log_name):
            with contextlib.suppress(OSError):
                (folder / name).unlink()
        with contextlib.suppress(OSError):
            (folder / ".hydra").rmdir()
        try:
            folder.rmdir()
        except OSError:  # something else is in it (a result, another run): keep it
            break
    _made.clear()


class OutputFolderCallback(Callback):
    """Before a run or sweep writes anything: its folder can be made and written
    (:func:`prepare_output_folder`), decided before any job runs."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        prepare_output_folder("hydra.run.dir", config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        prepare_output_folder("hydra.sweep.dir", config)


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

"""Launchers whose faults lose nothing: the basic (in-process) one and SLURM/local through
hydra-submitit-launcher.

Before any job runs, every job's config is composed and checked (``ih_sweep.cli.
check_job``): one bad combination (``-m n_heads=4,abc``, ``n_heads=65`` on a 64-head model
is found later) means nothing runs, with one line per bad job and exit status 2.

The stock launcher returns ``[j.results()[0] for j in jobs]``: the first cancelled job raises
while later jobs may still run, and Hydra then skips ``on_multirun_end``, so no summary is
written. This launcher waits for every job, writes the summary of what finished, and only
then fails with one message naming each job that did not finish. Preempted or timed-out jobs
are requeued by submitit's checkpoint mechanism (``max_num_timeout``) and resume from their
last checkpointed chunk. An array task cancelled before the scheduler started any task has no
record of its own anywhere (squeue, sacct, scontrol), and submitit would wait for it forever:
a job that stays absent from both squeue and sacct for ``LOST_AFTER_S`` counts as lost.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.errors import HydraException
from omegaconf import OmegaConf

from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from hydra_plugins.ih_sweep_launcher.job_folders import run_jobs
from ih_sweep.config.errors import UserError, one_line

log = logging.getLogger(__name__)


LOST_AFTER_S = 30.0  # continuous absence from squeue and sacct (accounting lags seconds)
POLL_S = 2.0


def fail_sweep(message: str) -> None:
    """End the sweep with ``message`` on stderr and exit status 1, without Hydra's
    traceback: what failed and why is all the reader needs."""
    import sys

    print(f"ih_sweep: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def slurm_knows(job_id: str) -> bool | None:
    """Whether SLURM has the job queued or running (squeue) or accounted (sacct); None when
    it cannot tell (a command failed), which never counts as absent."""
    def run(*cmd: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None

    queue = run("squeue", "-h", "-r", "-o", "%i", "-j", job_id)
    if queue is None or (queue.returncode != 0 and "Invalid job id" not in queue.stderr):
        return None
    if queue.returncode == 0 and job_id in queue.stdout.split():
        return True
    acct = run("sacct", "-n", "-P", "-X", "-o", "JobID", "-j", job_id)
    if acct is None or acct.returncode != 0:
        return None
    return job_id in acct.stdout.split()


def sweep_refusal(bad: Sequence[tuple[Sequence[str], str, str]],
                  job_overrides: Sequence[Sequence[str]]) -> str:
    """One line for the jobs of a sweep its checks refused: each distinct mistake once,
    with the jobs it concerns named by their own overrides (those not shared by every job
    of the sweep), e.g. ``config error: n_heads=65 is larger than the model's 64 heads
    (2 x 32) (job n_heads=65); none of the sweep's 2 jobs ran``. ``bad``: (the job's
    overrides, the error's kind, its message) for each refused job."""
    every = [set(filter_overrides(o)) for o in job_overrides]
    shared = set.intersection(*every) if every else set()
    groups: dict[str, list[str]] = {}
    for overrides, _, message in bad:
        own = [o for o in filter_overrides(overrides) if o not in shared]
        groups.setdefault(message, []).append(" ".join(own) or "the job")
    parts = []
    for message, names in groups.items():
        if len(names) == len(job_overrides) and len(names) > 1:
            which = f"all {len(names)} jobs"
        elif len(names) == 1:
            which = f"job {names[0]}"
        else:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more"
                                            if len(names) > 3 else "")
            which = f"{len(names)} jobs: {shown}"
        parts.append(f"{message} ({which})")
    return (f"{bad[0][1]} error: " + "; ".join(parts)
            + f"; none of the sweep's {len(job_overrides)} jobs ran")


def check_all_jobs(launcher: Any, job_overrides: Sequence[Sequence[str]]) -> None:
    """Compose and check every job's config before any runs; on a bad one, one line on
    stderr (:func:`sweep_refusal`) and exit status 2 (a user's mistake)."""
    import sys

    from omegaconf import open_dict

    from ih_sweep.cli import mark_started, remove_unused_output_folders
    from ih_sweep.config.errors import UserError
    from ih_sweep.model.runtime import long_lived
    from ih_sweep.pipeline.model_facts import keep_facts
    from ih_sweep.pipeline.preflight import check_job

    bad = []
    for i, overrides in enumerate(job_overrides):
        # the first check imports torch and transformers where it reads weight files'
        # headers: frozen as they are (imports and headers, no tensors; their garbage is
        # frozen too rather than walked). The other jobs' checks make garbage only (their
        # composed configs): the collector as usual
        with long_lived(collect=False) if i == 0 else contextlib.nullcontext():
            try:
                cfg = launcher.hydra_context.config_loader.load_sweep_config(
                    launcher.config, list(overrides))
                with open_dict(cfg):
                    del cfg["hydra"]
                check_job(cfg)
            except (UserError, HydraException) as err:
                why = str(err).strip().splitlines()
                bad.append((overrides, getattr(err, "kind", "config"),
                            " ".join(line.strip() for line in why[:2])))
    if bad:
        print(f"ih_sweep: {sweep_refusal(bad, job_overrides)}", file=sys.stderr)
        remove_unused_output_folders()  # the sweep folder, if this command made it
        raise SystemExit(2)
    keep_facts()  # what the checks found, for the next command (nothing when refused)
    mark_started()


def _plain_value(override: Any, config_loader: Any, choices: Any) -> bool:
    """Whether ``override`` (parsed) sets one value of the app's config and nothing else:
    ``key=value`` (no ``+``, ``++``, ``~``, no package, no sweep), a key outside Hydra's
    own and no config group (neither a choice of the composed defaults nor a group of the
    repository), a value that is no dict or list (those merge into what is there)."""
    from hydra.core.override_parser.types import OverrideType

    key = override.key_or_group
    if override.type != OverrideType.CHANGE or override.package is not None or \
            override.is_sweep_override() or override.is_hydra_override() or key in choices:
        return False
    repository = getattr(config_loader, "repository", None)
    if repository is None or repository.group_exists(key):
        return False
    return not isinstance(override.value(), (dict, list))


def compose_from_sibling(config_loader: Any, sibling_overrides: Sequence[str], sibling: Any,
                         overrides: Sequence[str]) -> Any | None:
    """The config Hydra composes for a job with ``overrides``, made from ``sibling`` (the
    config Hydra composed for ``sibling_overrides`` in the same sweep, left unchanged) when
    the two lists differ only in plain values (:func:`_plain_value`) at the same places:
    Hydra composes the defaults list (config groups) first and applies value overrides
    last (``ConfigLoaderImpl._load_configuration_impl``), so setting those values again on
    a copy of the sibling with Hydra's own ``_apply_overrides_to_config``, and writing the
    job's ``hydra.overrides.task`` and ``hydra.job.override_dirname`` as Hydra does, gives
    the same config (``tests/cli/test_resilient_compose.py``) for ~1/10 of a composition.
    None when the lists differ otherwise or a value does not apply: then Hydra composes
    it (and words any refusal itself)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parser = OverridesParser.create()
        mine = parser.parse_overrides(list(overrides))
        theirs = parser.parse_overrides(list(sibling_overrides))
    except Exception:
        return None
    choices = OmegaConf.select(sibling, "hydra.runtime.choices", default=None)
    if len(mine) != len(theirs) or choices is None:
        return None
    changed = []
    for a, b in zip(mine, theirs):
        if a.input_line == b.input_line:
            continue
        if a.key_or_group != b.key_or_group or not _plain_value(a, config_loader, choices) \
                or not _plain_value(b, config_loader, choices):
            return None
        changed.append(a)
    try:
        config = copy.deepcopy(sibling)
        ConfigLoaderImpl._apply_overrides_to_config(changed, config)
        task = [o for o in mine if not o.is_hydra_override()]
        config.hydra.overrides.task = [o.input_line for o in task]
        dirname = config.hydra.job.config.override_dirname
        config.hydra.job.override_dirname = get_overrides_dirname(
            overrides=task, kv_sep=dirname.kv_sep, item_sep=dirname.item_sep,
            exclude_keys=dirname.exclude_keys)
    except Exception:
        return None
    return config


def compose_each_job_once(config_loader: Any) -> None:
    """Hydra composes each job's config three times in a sweep (the sweeper's check that
    the batch composes, :func:`check_all_jobs`, the job's run), ~0.1-0.3 s each; from
    here on ``config_loader.load_sweep_config`` composes each job once in this command
    and hands out a copy of it, with the master config's resolver cache copied in as
    Hydra does (the run's time stamp and folder name), so every caller gets the config it
    got before, free to change it. A job whose overrides differ from an earlier job's in
    plain values alone (``n_heads=4`` / ``n_heads=8``) is made from that job's config
    (:func:`compose_from_sibling`) instead of composed again."""
    compose = config_loader.load_sweep_config
    if getattr(compose, "composes_once", False):
        return
    composed: dict[tuple[int, tuple[str, ...]], Any] = {}

    def load_sweep_config(master_config: Any, sweep_overrides: list[str]) -> Any:
        key = (id(master_config), tuple(sweep_overrides))
        if key not in composed:
            hydra_overrides = list(OmegaConf.select(master_config, "hydra.overrides.hydra",
                                                    default=None) or [])
            config = None
            for (master_id, other), (_, sibling) in composed.items():
                if master_id == id(master_config):
                    config = compose_from_sibling(config_loader, hydra_overrides + list(other),
                                                  sibling, hydra_overrides + list(sweep_overrides))
                    if config is not None:
                        break
            if config is None:
                config = compose(master_config, list(sweep_overrides))
            composed[key] = (master_config, config)
        config = copy.deepcopy(composed[key][1])
        OmegaConf.copy_cache(from_config=master_config, to_config=config)
        return config

    load_sweep_config.composes_once = True  # type: ignore[attr-defined]
    config_loader.load_sweep_config = load_sweep_config


def summarize_partial(config: Any, sweep_dir: Path, failures: list[tuple[str, str]]) -> str:
    """The summary of the jobs that finished, listing those that did not, and its table
    printed (:func:`ih_sweep.report.render.console_report`). Returns a line
    for the failure report when the summary itself failed (a step, not the jobs already
    reported), else ""."""
    from ih_sweep.cli import wants_summary

    if not wants_summary(config):
        return ""
    from ih_sweep.report.render import console_report
    from ih_sweep.report.summarize import SummaryError, SummaryIncomplete, summarize

    try:
        df = summarize(sweep_dir, not_finished=failures)
        if not df.empty:  # the finished jobs' table, as a sweep without failures prints it
            print(console_report(df, sweep_dir), flush=True)
    except SummaryIncomplete as err:
        if err.table is not None and not err.table.empty:
            print(console_report(err.table, sweep_dir), flush=True)
        if err.failed:
            return "\n  summary: " + "; ".join(f"{step} failed ({why})"
                                               for step, why in err.failed)
    except SummaryError:  # no finished job at all: the failures say everything
        return ""
    except Exception as err:
        log.error("summary of %s failed: %s", sweep_dir, err)
        return f"\n  summary: failed ({type(err).__name__}: {err})"
    return ""


class ResilientBasicLauncher(BasicLauncher):
    """Hydra's basic launcher (jobs one after another in this process) that checks every
    job first, runs every job even when one fails, writes the summary of those that
    finished, and then fails with one line per failed job."""

    def setup(self, **kwargs: Any) -> None:
        super().setup(**kwargs)
        compose_each_job_once(self.hydra_context.config_loader)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
               ) -> Sequence[JobReturn]:
        check_all_jobs(self, job_overrides)
        returns = run_jobs(self, job_overrides, initial_job_idx)  # a folder error fails one job
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        failures = []
        for ret in returns:
            if ret.status == JobStatus.FAILED:
                err = ret._return_value
                # the project's refusals are one line already: whole; others cut
                first = one_line(err, None if isinstance(err, UserError) else 300)
                folder = Path(OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir",
                                               default=None) or sweep_dir)
                name = str(folder.relative_to(sweep_dir)) if folder.is_relative_to(
                    sweep_dir) else " ".join(filter_overrides(ret.overrides or []))
                failures.append((name, f"{type(err).__name__}: {first}"))
        if failures:
            summary = summarize_partial(self.config, sweep_dir, failures)
            fail_sweep(f"{len(failures)} of {len(returns)} jobs failed; the finished jobs' "
                       f"results and the summary of them are in {sweep_dir}.\n  "
                       + "\n  ".join(f"{job}: {why}" for job, why in failures) + summary)
        return returns


class _ResilientMixin:
    """Replaces launch(): submit the array, wait for all, summarize, then report failures."""

    _EXECUTOR: str
    params: dict
    config: Any

    def _executor(self):
        import submitit

        init = {"folder": self.params["submitit_folder"]}
        if "max_num_timeout" in self.params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = self.params["max_num_timeout"]
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        skip = {"submitit_folder", "max_num_timeout"}
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v
                                      for k, v in self.params.items() if k not in skip})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
               ) -> Sequence[JobReturn]:
        from submitit.core.utils import FailedJobError, UncompletedJobError

        assert self.config is not None and len(job_overrides) > 0
        check_all_jobs(self, job_overrides)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("submitit '%s' sweep output dir: %s", self._EXECUTOR, sweep_dir)
        params = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                           Singleton.get_state()))
        try:
            jobs = self._executor().map_array(self, *zip(*params))
        except (subprocess.CalledProcessError, OSError, FailedJobError) as err:
            detail = getattr(err, "stderr", None) or getattr(err, "output", None) or err
            if isinstance(detail, bytes):
                detail = detail.decode(errors="replace")
            lines = str(detail).strip().splitlines()
            first = lines[-1] if lines else type(err).__name__  # sbatch's last word: the fatal
            fail_sweep(f"the {self._EXECUTOR} jobs could not be submitted ({first}); is "
                       f"{'SLURM' if self._EXECUTOR == 'slurm' else 'submitit'} set up here "
                       "(sbatch on PATH, SLURM_CONF)? Nothing ran.")
        lost = self._wait(jobs)
        returns: list[JobReturn] = []
        failures: list[tuple[str, str]] = []
        for job, (overrides, *_) in zip(jobs, params):
            name = f"job {job.job_id} ({' '.join(filter_overrides(overrides))})"
            if job.job_id in lost:
                failures.append((name, lost[job.job_id]))
                continue
            try:
                returns.append(job.results()[0])
            except (UncompletedJobError, FailedJobError) as err:
                state = _job_state(job)
                first = one_line(err, 200)
                failures.append((name, f"{state}: {first}"))
        if failures:
            summary = summarize_partial(self.config, sweep_dir, failures)
            fail_sweep(
                f"{len(failures)} of {len(jobs)} SLURM jobs did not finish; the finished jobs' "
                f"results and the summary of them are in {sweep_dir}; rerun the same command "
                "to run only what is missing.\n  "
                + "\n  ".join(f"{job}: {why}" for job, why in failures) + summary)
        return returns

    def _wait(self, jobs) -> dict[str, str]:
        """Block until every job is done or lost; the lost ones with why."""
        lost: dict[str, str] = {}
        absent_since: dict[str, float] = {}
        while True:
            waiting = [j for j in jobs if j.job_id not in lost and not j.done()]
            if not waiting:
                return lost
            if self._EXECUTOR == "slurm":
                now = time.monotonic()
                for job in waiting:
                    # submitit's state of a task that was pending can stay PENDING after its
                    # cancellation removed every record (its watcher keeps the last state it
                    # read): for UNKNOWN and PENDING only SLURM itself (squeue, sacct) counts
                    if _job_state(job) not in ("UNKNOWN", "PENDING") or \
                            slurm_knows(job.job_id) is not False:
                        absent_since.pop(job.job_id, None)
                    elif now - absent_since.setdefault(job.job_id, now) >= LOST_AFTER_S:
                        lost[job.job_id] = (
                            f"LOST: neither squeue nor sacct has known it for {LOST_AFTER_S:.0f} "
                            "s (an array task cancelled before any task started has no record)")
                        log.error("job %s: %s", job.job_id, lost[job.job_id])
            time.sleep(POLL_S)


def _job_state(job) -> str:
    try:
        return str(job.state)
    except Exception:  # accounting may lag
        return "UNKNOWN"


class ResilientSlurmLauncher(_ResilientMixin, SlurmLauncher):
    pass


class ResilientLocalLauncher(_ResilientMixin, LocalLauncher):
    pass

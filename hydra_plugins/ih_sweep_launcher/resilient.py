"""SLURM through hydra-submitit-launcher, with faults that lose nothing.

The stock launcher returns ``[j.results()[0] for j in jobs]``: the first cancelled job raises
while later jobs may still run, and Hydra then skips ``on_multirun_end``, so no summary is
written. This launcher waits for every job, writes the summary of what finished, and only
then fails with one message naming each job that did not finish. Preempted or timed-out jobs
are requeued by submitit's checkpoint mechanism (``max_num_timeout``) and resume from their
last checkpointed chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from omegaconf import OmegaConf

from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

log = logging.getLogger(__name__)


class SweepIncomplete(RuntimeError):
    pass


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
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("submitit '%s' sweep output dir: %s", self._EXECUTOR, sweep_dir)
        params = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                           Singleton.get_state()))
        jobs = self._executor().map_array(self, *zip(*params))
        returns: list[JobReturn] = []
        failures: list[tuple[str, str]] = []
        for job, (overrides, *_) in zip(jobs, params):
            try:
                returns.append(job.results()[0])
            except (UncompletedJobError, FailedJobError) as err:
                state = _job_state(job)
                first = str(err).strip().splitlines()[0][:200]
                failures.append((f"job {job.job_id} ({' '.join(filter_overrides(overrides))})",
                                 f"{state}: {first}"))
        if failures:
            self._summarize_partial(sweep_dir, failures)
            raise SweepIncomplete(
                f"{len(failures)} of {len(jobs)} SLURM jobs did not finish; the finished jobs' "
                f"results and the summary of them are in {sweep_dir}; rerun the same command "
                "to run only what is missing.\n  "
                + "\n  ".join(f"{job}: {why}" for job, why in failures))
        return returns

    def _summarize_partial(self, sweep_dir: Path, failures: list[tuple[str, str]]) -> None:
        if not self.config.get("summarize", True):
            return
        from ih_sweep.summary import summarize

        try:
            summarize(sweep_dir, not_finished=failures)
        except Exception as err:  # the failure report below matters more
            log.error("summary of %s failed: %s", sweep_dir, err)


def _job_state(job) -> str:
    try:
        return str(job.state)
    except Exception:  # accounting may lag
        return "UNKNOWN"


class ResilientSlurmLauncher(_ResilientMixin, SlurmLauncher):
    pass


class ResilientLocalLauncher(_ResilientMixin, LocalLauncher):
    pass

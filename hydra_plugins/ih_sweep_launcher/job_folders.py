"""Jobs one after another in this process (Hydra's basic launcher's loop) where a job whose
folder cannot be written fails alone.

Hydra's ``run_job`` creates the job's folder, opens its log file and saves ``.hydra/`` before
it calls the job, outside the guard that turns the job's own exceptions into a failed
:class:`~hydra.core.utils.JobReturn`: a full disk or a read-only folder there (ENOSPC, EROFS,
EACCES, EFBIG, a file where the folder should be) used to end the whole sweep with a traceback,
the later jobs never run and no summary written. :func:`run_jobs` runs each job as the basic
launcher does and turns such an error into that job's failure, one line naming the folder and
the operating system's error (:class:`~ih_sweep.io_utils.WriteError`); the other jobs run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import (
    JobReturn,
    JobStatus,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from omegaconf import DictConfig, OmegaConf, open_dict

from ih_sweep.io_utils import WriteError

log = logging.getLogger(__name__)


def os_error_in(err: BaseException) -> OSError | None:
    """The OSError ``err`` is or was raised from (logging's ``dictConfig`` wraps a log file
    it cannot open in a ValueError), or None."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def job_folder(sweep_config: DictConfig) -> Path:
    """The job's folder: ``hydra.runtime.output_dir`` once Hydra set it, else the sweep
    folder joined with the job's subfolder."""
    out = OmegaConf.select(sweep_config, "hydra.runtime.output_dir", default=None)
    if out:
        return Path(str(out))
    sweep_dir = Path(str(sweep_config.hydra.sweep.dir))
    try:
        return sweep_dir / str(sweep_config.hydra.sweep.subdir)
    except Exception:  # a subdir that needs what only a running job has
        return sweep_dir


def folder_failure(err: OSError, folder: Path) -> WriteError:
    """``err`` (raised by Hydra while it prepared ``folder``) as one line naming the folder,
    the file and the operating system's error."""
    named = Path(str(err.filename)) if err.filename else None
    what = f" ({named})" if named and named.absolute() != folder.absolute() else ""
    return WriteError(err.errno, f"cannot write the job folder {folder}{what}: "
                                 f"{err.strerror or err}")


def run_jobs(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
             ) -> list[JobReturn]:
    """Hydra's ``BasicLauncher.launch`` (hydra-core 1.3) for ``launcher`` (a BasicLauncher set
    up by Hydra), except that an OSError while Hydra prepares a job's folder (or one
    that ends Hydra's part of the job) makes that job a failed JobReturn whose value is a
    :class:`WriteError`, and the next job runs."""
    setup_globals()
    assert launcher.hydra_context is not None and launcher.config is not None
    assert launcher.task_function is not None
    config = launcher.config
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    log.info("Launching %d jobs locally", len(job_overrides))
    runs: list[JobReturn] = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        sweep_config = launcher.hydra_context.config_loader.load_sweep_config(
            config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        try:
            ret = run_job(hydra_context=launcher.hydra_context,
                          task_function=launcher.task_function, config=sweep_config,
                          job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        except Exception as err:
            os_err = os_error_in(err)
            if os_err is None:
                raise
            configure_log(config.hydra.hydra_logging, config.hydra.verbose)
            failure = folder_failure(os_err, job_folder(sweep_config))
            log.error("%s", failure)
            ret = JobReturn(overrides=list(overrides), cfg=None, hydra_cfg=sweep_config,
                            status=JobStatus.FAILED)
            ret.return_value = failure
        runs.append(ret)
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return runs

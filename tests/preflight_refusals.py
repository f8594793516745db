"""What the checks before any job (:func:`ih_sweep.pipeline.preflight.check_job`) say about
a command line, in this process or in a child process that file permissions bind even when
the tests run as root; shared by the data and score-file refusal tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from compose_config import ROOT, compose

from ih_sweep.config.errors import UserError


def refusal(*overrides: str) -> str:
    """``"<kind> error: <message>"`` of the first check that refuses ``overrides`` (the
    message asserted to be one line), or ``"accepted"``."""
    from ih_sweep.pipeline.preflight import check_job

    try:
        check_job(compose("debug=fast", *overrides))
    except UserError as err:
        message = f"{err.kind} error: {err}"
        assert "\n" not in message, message
        return message
    return "accepted"


def bound_by_permissions() -> list[str]:
    """The command prefix that runs a process bound by file permissions: nothing for a
    user other than root; for root, ``setpriv`` dropping the capabilities that bypass them
    (dac_override, dac_read_search). Skips the test where root has no setpriv."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: chmod does not stop root's reads")
    return [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search",
            "--"]


_CHILD = """
import sys
from hydra import compose, initialize_config_dir
from ih_sweep.cli import config_dir
from ih_sweep.config.errors import UserError
from ih_sweep.pipeline.preflight import check_job
try:
    open(sys.argv[1], "rb").close()
    print("CAN READ")
    raise SystemExit
except PermissionError:
    pass
except IsADirectoryError:
    import os
    try:
        os.listdir(sys.argv[1])
        print("CAN READ")
        raise SystemExit
    except PermissionError:
        pass
with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
    cfg = compose(config_name="config", overrides=sys.argv[2:])
try:
    check_job(cfg)
    print("accepted")
except UserError as err:
    print(f"{err.kind} error: {err}")
"""


def refusal_bound_by_permissions(locked: Path, *overrides: str) -> str:
    """:func:`refusal` in a child process bound by file permissions
    (:func:`bound_by_permissions`), where ``locked`` (chmod 000) cannot be read; skips the
    test where the child can read it all the same."""
    proc = subprocess.run([*bound_by_permissions(), sys.executable, "-c", _CHILD, str(locked),
                           "debug=fast", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.strip().splitlines()
    if out == ["CAN READ"]:
        pytest.skip(f"{locked} is readable in spite of chmod 000 here")
    assert len(out) == 1, proc.stdout
    return out[0]

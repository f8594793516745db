"""What the command imports before it answers: ``--help``, a config error (Hydra's or the
schema's rules) and the pre-job checks' refusals that need no model (files, folders) import
none of torch, transformers, matplotlib, scipy or pandas, so that the answer comes within
about a second. Each case runs the real CLI (``python -m ih_sweep``) in a subprocess from a
temporary folder and reads ``sys.modules`` when the command has ended; a refusal that does
need torch (a CUDA device the machine lacks) shows that the check sees an import."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore

from ih_sweep import cli

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "matplotlib", "scipy", "pandas")

# the command, run as python -m ih_sweep; at its end: the exit status and the heavy modules
# it imported (one line of JSON into the file named by the first argument)
PROBE = """\
import json, runpy, sys
report, *args = sys.argv[1:]
sys.argv = ["ih_sweep", *args]
code = 0
try:
    runpy.run_module("ih_sweep", run_name="__main__", alter_sys=True)
except SystemExit as exit_:
    code = exit_.code or 0
with open(report, "w") as f:
    json.dump({"code": code, "heavy": [m for m in HEAVY if m in sys.modules]}, f)
""".replace("HEAVY", repr(HEAVY))


def run_probe(tmp_path: Path, *args: str) -> tuple[dict, subprocess.CompletedProcess]:
    """``python -m ih_sweep ARGS`` from ``tmp_path`` (this checkout's package first on the
    path): its report and the finished process."""
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(report), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert report.is_file(), proc.stderr[-3000:]
    return json.loads(report.read_text()), proc


def test_help_imports_nothing_heavy(tmp_path):
    report, proc = run_probe(tmp_path, "--help")
    assert report["code"] == 0, proc.stderr[-3000:]
    assert "== The main sweep" in proc.stdout and "== Config groups" in proc.stdout
    assert report["heavy"] == []


CONFIG_ERRORS = [
    (["n_heads=abc"], "ih_sweep: config error: n_heads='abc' is not allowed"),
    (["condition=bogus"], "ih_sweep: config error: condition=bogus is not allowed"),
    (["-m", "n_heads=abc", "condition=high,low"], "ih_sweep: config error: n_heads='abc'"),
    (["nheads=4"], "ih_sweep: config error: "),
    (["model.path=/no/such/model"], "ih_sweep: model error: model.path=/no/such/model"),
    (["data=babi_files", "data.path=/no/such/data"], "ih_sweep: data error: data.path="),
    (["job=train_tiny", "train.out_dir={file}"], "ih_sweep: config error: train.out_dir="),
    (["hydra.run.dir={file}/run"], "ih_sweep: config error: hydra.run.dir="),
]


@pytest.mark.parametrize("args,line", CONFIG_ERRORS, ids=[" ".join(a) for a, _ in CONFIG_ERRORS])
def test_config_error_and_refusal_import_nothing_heavy(tmp_path, args, line):
    (tmp_path / "a_file").write_text("not a folder\n")
    args = [a.format(file=tmp_path / "a_file") for a in args]
    report, proc = run_probe(tmp_path, *args)
    assert report["code"] == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(line), proc.stderr[-3000:]
    assert report["heavy"] == []


def test_a_refusal_that_needs_torch_is_seen_importing_it(tmp_path):
    """The probe is not blind: a device check asks torch (no machine has 100 GPUs)."""
    report, proc = run_probe(tmp_path, "device=cuda:99")
    assert report["code"] == 2, proc.stderr[-3000:]
    assert "ih_sweep: device error: device=cuda:99" in proc.stderr
    assert "torch" in report["heavy"]


def test_the_config_store_is_shared_only_while_the_command_runs():
    """Hydra's copies of its config repository share the live store inside the command
    (:func:`ih_sweep.cli.config_store_shared`); outside it, a copy is a copy again."""
    store = ConfigStore.instance()
    with cli.config_store_shared():
        assert copy.deepcopy(store) is store
        assert copy.deepcopy({"store": store})["store"] is store
    assert copy.deepcopy(store) is not store

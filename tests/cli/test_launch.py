"""End-to-end runs through the real CLI (``python -m ih_sweep``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from compose_config import cli

from ih_sweep.pipeline.records import RESULT_COLUMNS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
_UMASK = os.umask(0o022)
os.umask(_UMASK)
NORMAL_MODE = 0o666 & ~_UMASK  # a file's normal mode under the umask the CLI inherits (0o644)


@pytest.fixture(scope="module")
def main_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    args = ["-m", "n_heads=4,8,16", "condition=high,low,none", "data.n_stories=150",
            f"hydra.sweep.dir={out}", f"paths.cache_dir={out / 'cache'}", "eval.progress=false"]
    first = cli(*args)
    return out, args, first


def test_main_sweep_writes_one_folder_per_job(main_sweep):
    out, _, _ = main_sweep
    jobs = sorted(out.glob("*/job.json"))
    assert len(jobs) == 9
    cells = set()
    for job_file in jobs:
        rec = json.loads(job_file.read_text())
        folder = job_file.parent
        assert rec["status"] == "complete" and rec["n_items"] == 150
        res = pd.read_csv(folder / "results.csv")
        assert list(res.columns) == RESULT_COLUMNS and len(res) == 150
        assert res["story"].is_unique
        heads = pd.read_csv(folder / "heads.csv")
        n, cond = rec["n_heads"], rec["condition"]
        cells.add((n, cond))
        assert len(heads) == n and (n == 0) == (cond == "none")
        assert rec["settings"]["condition"] == cond
        assert (folder / "results.csv").stat().st_mode & 0o777 == NORMAL_MODE
        assert rec["accuracy"] == pytest.approx(res["correct"].mean())
        assert (folder / ".hydra" / "config.yaml").is_file()
    assert cells == {(n, c) for n in (4, 8, 16) for c in ("high", "low")} | {(0, "none")}
    for n in (4, 8, 16):
        hi = pd.read_csv(next(out.glob(f"condition=high,*n_heads={n}*/heads.csv")))
        lo = pd.read_csv(next(out.glob(f"condition=low,*n_heads={n}*/heads.csv")))
        pairs_hi = set(zip(hi.layer, hi["head"]))
        pairs_lo = set(zip(lo.layer, lo["head"]))
        assert not pairs_hi & pairs_lo
        assert hi.layer.value_counts().to_dict() == lo.layer.value_counts().to_dict()
        assert hi.score.min() >= lo.score.max()


def test_none_is_evaluated_once(main_sweep):
    """The unablated job is the same at every N: evaluated once, then reused by its hash."""
    out, _, first = main_sweep
    recs = [json.loads(p.read_text()) for p in out.glob("condition=none*/job.json")]
    assert len(recs) == 3 and len({r["config_hash"] for r in recs}) == 1
    assert (first.stdout + first.stderr).count("reusing the finished evaluation") == 2


def test_summary_written_by_callback(main_sweep):
    out, _, _ = main_sweep
    for name in ("summary.csv", "summary.md", "summary.tex", "accuracy_vs_n.png"):
        assert (out / name).is_file(), name
    df = pd.read_csv(out / "summary.csv")
    assert len(df) == 7  # the three `none` jobs are one row
    assert "| N |" in main_sweep[2].stdout and str(out) in main_sweep[2].stdout


def test_rerun_skips_finished_jobs(main_sweep):
    """Also when only speed settings differ (same job folders, same config hash)."""
    out, args, _ = main_sweep
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/results.csv")}
    again = cli(*args, "eval.cpu_workers=1", "eval.batch_size=7")
    assert again.stdout.count("skipping") + again.stderr.count("skipping") == 9
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/results.csv")} == before


def test_a_value_outside_the_schema_is_refused_at_compose_time(tmp_path):
    """Also with --cfg job, which prints the config without running a job."""
    proc = cli("condition=best", f"hydra.run.dir={tmp_path}", "--cfg", "job", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "ih_sweep: config error: condition=best is not allowed; allowed: high, low, random, "
        "none"]
    assert not proc.stdout.strip()


def test_a_mistyped_key_is_one_line_and_exit_2(tmp_path):
    proc = cli("+eval.max_new_token=1", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "ih_sweep: config error: eval.max_new_token=1 is not a config key; keys of eval: "
        "metric, scope, max_new_tokens, format, n_shots, demo_seed, demo_lang, stop, "
        "batch_size, cpu_workers, progress, checkpoint_items, fast_layers, layer_store_mb"]
    assert not list(tmp_path.glob("*.csv"))


def _weightless_model(tmp_path: Path) -> Path:
    """A model folder with the tiny config but no weights: loading it would fail loudly."""
    from ih_sweep.model.loading import ASSET_DIR

    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text((ASSET_DIR / "config.json").read_text())
    return folder


def test_too_many_heads_fails_before_the_model_loads(tmp_path):
    proc = cli("n_heads=65", f"hydra.run.dir={tmp_path}/r", f"paths.cache_dir={tmp_path}/c",
               check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "ih_sweep: config error: n_heads=65 is larger than the model's 64 heads (2 x 32)"]
    assert "loading" not in proc.stdout + proc.stderr  # no weights were read
    assert not (tmp_path / "r").exists()


def test_missing_score_file_fails_before_the_model_loads(tmp_path):
    folder = _weightless_model(tmp_path)
    proc = cli("model=hub", f"model.path={folder}", "scoring.source=file",
               f"scoring.file={tmp_path}/nope.csv", f"hydra.run.dir={tmp_path}/r", check=False)
    assert proc.returncode != 0
    assert "nope.csv: no such score file" in proc.stderr


def test_score_task_writes_table_and_heatmap(tmp_path):
    cli("job=score", f"hydra.run.dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache")
    df = pd.read_csv(tmp_path / "scores.csv")
    assert len(df) == 64 and set(df.columns) >= {"model", "layer", "head", "prefix", "copying",
                                                 "combined", "n_sequences", "seed"}
    assert (tmp_path / "scores.png").stat().st_size > 1000


def test_random_and_mean_conditions_run(tmp_path):
    cli("-m", "condition=random", "control_seed=1,2", "n_heads=4", "ablation=mean",
        "data.n_stories=20", f"hydra.sweep.dir={tmp_path}", f"paths.cache_dir={tmp_path}/c",
        "eval.progress=false", "eval.scope=all")
    recs = [json.loads(p.read_text()) for p in tmp_path.glob("*/job.json")]
    assert len(recs) == 2 and all(r["n_items"] == 100 for r in recs)
    assert recs[0]["heads"] != recs[1]["heads"]
    assert (tmp_path / "icl_curve.png").is_file()


def test_help_says_what_the_tool_does():
    out = cli("--help").stdout
    for needed in ("induction heads", "ih-sweep -m n_heads=4,8,16 condition=high,low,none",
                   "-m (--multirun)", "high    the top-N heads", "model: ", "scoring: ",
                   "outputs/multirun/", "ih_sweep/config/schema.py"):
        assert needed in out, needed


def test_one_bad_job_of_a_sweep_means_none_runs(tmp_path):
    proc = cli("-m", "n_heads=-1,4", "debug=fast", f"hydra.sweep.dir={tmp_path}/s",
               f"paths.cache_dir={tmp_path}/c", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ih_sweep: config error: n_heads=-1 is not "
                                                   "allowed"), lines
    assert lines[0].endswith(" (job n_heads=-1); none of the sweep's 2 jobs ran"), lines
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("s/*/job.json"))


def test_a_job_failing_at_run_time_stops_no_other(tmp_path):
    """A job that passes every check before the sweep and fails when it runs (here: a
    file where its folder goes, so Hydra cannot make it): the other job still runs, the
    summary of it is written, listing the failed job, and the sweep exits 1 naming the
    failed job and why."""
    sweep = tmp_path / "s"
    sweep.mkdir()
    (sweep / "debug=fast,n_heads=8").write_text("not a folder")
    proc = cli("-m", "n_heads=8,4", "debug=fast", f"hydra.sweep.dir={sweep}",
               f"paths.cache_dir={tmp_path}/c", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-2:] == [
        f"ih_sweep: 1 of 2 jobs failed; the finished jobs' results and the summary of them "
        f"are in {sweep}.",
        f"  debug=fast,n_heads=8: WriteError: [Errno 17] cannot write the job folder "
        f"{sweep}/debug=fast,n_heads=8: File exists"]
    assert "Traceback" not in proc.stderr
    assert json.loads((sweep / "debug=fast,n_heads=4/job.json").read_text())["n_items"] == 20
    md = (sweep / "summary.md").read_text()
    assert "## Jobs left out" in md and "`debug=fast,n_heads=8`: WriteError" in md
    # the finished job's table is printed as a sweep without failures prints it
    assert "| N | top-N (induction) ablated |" in proc.stdout and "| 4 | " in proc.stdout


def test_a_refusal_after_the_load_is_said_whole(tmp_path):
    """A norm-matched control that cannot exist (issue #30: at N=16 on the tiny model the
    top heads' layer holds only 16 others, none within a factor 2): the job's refusal, a
    line of ~450 characters, reaches the failure report whole, not cut at 300."""
    proc = cli("-m", "n_heads=16", "condition=high,random", "control.match=layer_norm",
               "debug=fast", f"hydra.sweep.dir={tmp_path}/s", f"paths.cache_dir={tmp_path}/c",
               check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "SelectionError: control.match=layer_norm cannot match n_heads=16" in last
    assert last.endswith("allowed: a larger control.norm_factor, a smaller n_heads, or "
                         "control.match=layer"), last
    assert "| 16 | " in proc.stdout  # the high job's row


def test_slurm_that_cannot_submit_says_so_in_one_line(tmp_path):
    # a config sbatch cannot parse: it fails at once (a missing one is retried for ~60 s)
    broken = tmp_path / "slurm.conf"
    broken.write_text("this is not a slurm configuration\n")
    env_conf = {"SLURM_CONF": str(broken)}
    proc = subprocess.run([sys.executable, "-m", "ih_sweep", "-m", "hydra/launcher=slurm",
                           "debug=fast", f"hydra.sweep.dir={tmp_path}/s"], cwd=ROOT,
                          env={**os.environ, **env_conf, "PATH": os.environ["PATH"]},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ih_sweep: the slurm jobs could not be submitted (") and \
        last.endswith("Nothing ran."), last
    assert "Traceback" not in proc.stderr


def test_a_long_override_makes_a_short_job_folder(tmp_path):
    """-m with a model.path of 217 characters: a folder name over 255 bytes used to fail
    (OSError: File name too long); it is shortened and summarize finds the job."""
    import shutil as sh

    from ih_sweep.model.loading import ASSET_DIR

    model = tmp_path / ("m" * 200) / "tiny"
    sh.copytree(ASSET_DIR, model)
    cli("-m", "model=hub", f"model.path={model}", "n_heads=4", "condition=high,none",
        "debug=fast", f"hydra.sweep.dir={tmp_path}/s", f"paths.cache_dir={tmp_path}/c")
    folders = [p.parent for p in (tmp_path / "s").glob("*/job.json")]
    assert len(folders) == 2 and all(len(f.name.encode()) <= 200 for f in folders)
    assert len(pd.read_csv(tmp_path / "s/summary.csv")) == 2
    assert "missing" not in (tmp_path / "s/summary.md").read_text()

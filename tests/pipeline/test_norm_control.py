"""Comparability shown and controlled (issue #30 item 1): every evaluate job writes each
ablated head's output norm (heads.csv ``output_norm``) and their mean (job.json
``output_norm_mean``); ``condition=random control.match=layer_norm`` draws heads whose
norms match the top-N's, in one draw or K; the default ``control.match=layer`` draws the
heads it always drew."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from compose_config import compose, run_job

from ih_sweep.ablation.means import reference_batches
from ih_sweep.config.hydra import settings
from ih_sweep.config.identity import config_hash
from ih_sweep.heads.output_norms import head_output_norms
from ih_sweep.pipeline.records import HEAD_COLUMNS, SeedsRecord, read_record

ROOT = Path(__file__).resolve().parents[2]
FAST = ("debug=fast",)
# condition=random n_heads=8 control_seed=0 with debug=fast, as drawn before control.match
# existed (main at f0353ac: heads.csv of `ih-sweep debug=fast condition=random`)
TODAYS_RANDOM_HEADS = [[1, 17], [1, 1], [1, 30], [1, 12], [1, 9], [1, 8], [1, 0], [1, 14]]


def _heads(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "heads.csv")


def test_heads_csv_has_each_heads_output_norm_and_job_json_their_mean(tmp_path, tiny):
    record = run_job(tmp_path / "high", *FAST, "n_heads=4")
    heads = _heads(tmp_path / "high")
    assert list(heads.columns) == HEAD_COLUMNS and HEAD_COLUMNS[-1] == "output_norm"
    assert heads[["layer", "head"]].values.tolist() == record.heads
    # the norms over the job's first ablation.n_reference prompts (all 20 of debug=fast)
    from ih_sweep.pipeline.stages import load_items

    model, tok = tiny
    items = load_items(settings(compose(*FAST))).items
    norms = head_output_norms(model, reference_batches(tok, items, len(items), model))
    np.testing.assert_allclose(heads["output_norm"], [norms[la, h] for la, h in record.heads],
                               rtol=0, atol=1e-9)
    assert record.output_norm_mean == heads["output_norm"].mean()
    assert read_record(tmp_path / "high").output_norm_mean == record.output_norm_mean
    low = run_job(tmp_path / "low", *FAST, "n_heads=4", "condition=low")
    assert low.output_norm_mean < record.output_norm_mean / 2  # the gap the column shows
    none = run_job(tmp_path / "none", *FAST, "condition=none")
    assert none.output_norm_mean is None and _heads(tmp_path / "none").empty
    assert list(_heads(tmp_path / "none").columns) == HEAD_COLUMNS


def test_the_default_layer_match_draws_todays_heads(tmp_path):
    default = run_job(tmp_path / "default", *FAST, "condition=random")
    assert default.heads == TODAYS_RANDOM_HEADS
    layer = run_job(tmp_path / "layer", *FAST, "condition=random", "control.match=layer")
    assert layer.heads == TODAYS_RANDOM_HEADS and layer.config_hash == default.config_hash
    assert layer.reused_evaluation  # the same job: the store serves it


def test_norm_matched_draws_lie_within_the_factor_in_a_several_draw_job(tmp_path):
    high = run_job(tmp_path / "high", *FAST, "n_heads=4")
    top = _heads(tmp_path / "high")
    args = (*FAST, "n_heads=4", "condition=random", "control.match=layer_norm")
    parent = run_job(tmp_path / "k", *args, "control_seeds=3")
    assert isinstance(parent, SeedsRecord) and "output_norms" in parent.shared
    drawn = set()
    for seed, folder in zip(parent.control_seeds, parent.seed_folders):
        heads = _heads(tmp_path / "k" / folder)
        record = read_record(tmp_path / "k" / folder)
        assert not set(map(tuple, record.heads)) & set(map(tuple, high.heads))
        assert heads["layer"].tolist() == top["layer"].tolist()  # top order, layer by layer
        ratio = heads["output_norm"].to_numpy() / top["output_norm"].to_numpy()
        assert ((ratio >= 1 / 2) & (ratio <= 2)).all(), (seed, ratio)
        assert record.config_hash == config_hash(compose(*args, f"control_seed={seed}"))
        drawn.add(tuple(map(tuple, record.heads)))
    assert len(drawn) > 1
    plain = run_job(tmp_path / "plain", *FAST, "n_heads=4", "condition=random")
    assert plain.config_hash != read_record(tmp_path / "k" / parent.seed_folders[0]).config_hash


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "ih_sweep", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_runs_a_norm_matched_control_and_refuses_an_impossible_one(tmp_path):
    proc = _cli("debug=fast", "condition=random", "control.match=layer_norm", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (folder,) = [p.parent for p in (tmp_path / "outputs" / "runs").glob("*/heads.csv")]
    heads = _heads(folder)
    assert list(heads.columns) == HEAD_COLUMNS and len(heads) == 8
    record = read_record(folder)
    assert record.settings["control"] == {"match": "layer_norm", "norm_factor": 2.0}
    assert record.output_norm_mean == heads["output_norm"].mean()
    # the tiny model's top-16 sit in one layer of 32: the 16 others cannot match them. From
    # a fresh folder (the model loaded, the scores and norms computed first), the refusal
    # is still the one line on stderr: debug=fast's eval.progress=false keeps transformers'
    # loading bar off too
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    proc = _cli("debug=fast", "condition=random", "control.match=layer_norm", "n_heads=16",
                cwd=fresh)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("ih_sweep: config error: control.match=layer_norm cannot "
                               "match n_heads=16: layer 1 has no 16 heads")
    assert lines[0].endswith("allowed: a larger control.norm_factor, a smaller n_heads, or "
                             "control.match=layer")


def census_cases(tmp_path: Path) -> list[tuple[str, list[str]]]:
    """This module's refusals as (name, CLI arguments), for scripts/bad_inputs_census.py
    (which runs each through the real CLI)."""
    return [(" ".join(args), list(args)) for args in (
        ("condition=random", "control.match=layer_norm", "n_heads=16"),
        ("condition=random", "control.norm_factor=1"),
        ("condition=random", "control.match=norm"))]


def test_a_draw_of_a_set_drawn_before_takes_its_results_and_equals_its_own_job(tmp_path):
    # at N=16 the tiny model's top-16 fill half of layer 1, so every layer-matched draw is
    # the layer's other 16 heads: the second draw is the first's set, not evaluated again
    args = (*FAST, "n_heads=16", "condition=random")
    parent = run_job(tmp_path / "k", *args, "control_seeds=2")
    first, second = (read_record(tmp_path / "k" / f) for f in parent.seed_folders)
    assert set(map(tuple, first.heads)) == set(map(tuple, second.heads))
    assert first.same_heads_as is None and second.same_heads_as == 0
    assert "same_heads" in parent.shared and "eval_s" not in second.timings
    alone = run_job(tmp_path / "alone", *args, "control_seed=1", "paths.cache_dir="
                    + str(tmp_path / "other_cache"))
    assert alone.same_heads_as is None
    assert (tmp_path / "alone" / "results.csv").read_bytes() == \
        (tmp_path / "k" / parent.seed_folders[1] / "results.csv").read_bytes()
    assert alone.mechanism == second.mechanism

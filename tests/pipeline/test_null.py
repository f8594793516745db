"""A random null in one job (issue #18 item 4): ``condition=random control_seeds=K``
evaluates K draws with the model loaded once, each written as the single-seed job's folder
(same results, same config hash, reused both ways, resumed at the draw it reached), and the
summary's empirical p of every condition within the null with the null's band."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from compose_config import compose, run_job
from summary_jobs import make_job

from ih_sweep.config.hydra import settings
from ih_sweep.config.identity import config_hash
from ih_sweep.pipeline import draws
from ih_sweep.pipeline.records import SeedsRecord, read_record, store_dir
from ih_sweep.report import statistics as st
from ih_sweep.report.summarize import find_jobs, summarize

FAST = ("debug=fast", "condition=random", "n_heads=8")


# --------------------------------------------------------------------------- the p rule
def test_empirical_p_counts_draws_at_or_below_the_observation():
    null = [0.5, 0.6, 0.6, 0.7, 0.9]  # K = 5
    assert st.empirical_p(0.4, null) == pytest.approx(1 / 6)  # below every draw: 1/(K+1)
    assert st.empirical_p(0.6, null) == pytest.approx(4 / 6)  # ties count against it
    assert st.empirical_p(0.65, null) == pytest.approx(4 / 6)
    assert st.empirical_p(0.95, null) == 1.0  # hurts less than every draw
    assert np.isnan(st.empirical_p(0.5, [])) and np.isnan(st.empirical_p(np.nan, null))
    band = st.null_band(null)
    assert band == pytest.approx(tuple(pd.Series(null).quantile([0.025, 0.975])))
    assert band == pytest.approx((0.51, 0.88))  # 0.5 + 0.1 * 0.1; 0.7 + 0.9 * 0.2
    assert all(np.isnan(st.null_band([])))


def test_summary_gives_every_condition_its_p_within_the_null(tmp_path):
    """Hand-made sweep: 19 draws at N=4 with 80..98 of 100 correct; ``high`` at 85 has 6
    draws at or below it, ``low`` at 99 all 19; no draws at N=8, so its row has none."""
    base = np.ones(100, bool)
    make_job(tmp_path, "none", 4, "none", base)
    for n in (4, 8):
        make_job(tmp_path, f"high{n}", n, "high", np.arange(100) >= 15)
    make_job(tmp_path, "low4", 4, "low", np.arange(100) >= 1)
    for k in range(19):
        make_job(tmp_path, f"rand{k}", 4, "random", np.arange(100) >= 20 - k, seed=k)
    df = summarize(tmp_path).set_index(["condition", "n_heads", "control_seed"])
    high, low = df.loc[("high", 4, 0)], df.loc[("low", 4, 0)]
    assert high.p_vs_random == pytest.approx((1 + 6) / 20) and high.n_random == 19
    assert low.p_vs_random == pytest.approx(1.0) and low.n_random == 19
    accs = [(80 + k) / 100 for k in range(19)]
    for row in (high, low):
        assert (row.random_acc_p2_5, row.random_acc_p97_5) == pytest.approx(
            tuple(np.percentile(accs, [2.5, 97.5])))
    assert df.loc[("high", 8, 0)][["p_vs_random", "n_random", "random_acc_p2_5"]].isna().all()
    others = df[df.index.get_level_values("condition").isin(["random", "none"])]
    assert others[["p_vs_random", "n_random", "random_acc_p97_5"]].isna().all().all()
    md = (tmp_path / "summary.md").read_text()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines()
            if line.startswith("|")]
    header = rows[0]
    assert header[-3:-1] == ["random 2.5-97.5% (draws)", "p vs random"]
    shown = {r[1]: dict(zip(header, r)) for r in rows if r[0] == "4" and r[1] != "random"}
    lo, hi = np.percentile(accs, [2.5, 97.5])
    assert shown["high"]["random 2.5-97.5% (draws)"] == f"[{100 * lo:.1f}, {100 * hi:.1f}] (19)"
    assert shown["high"]["p vs random"] == "0.35" and shown["low"]["p vs random"] == "1"
    assert all(r[-1] == "" for r in rows[2:] if r[1] == "random")
    assert "one-sided" in md and "1 / (K + 1)" in md
    # the draws are the null's sample, not hypotheses: outside Holm's family, whose members
    # are high N=4, high N=8 and low N=4 (the smallest of three p values times 3)
    assert others.loc["random"].p_vs_none_holm.isna().all()
    tested = df.loc[[("high", 4, 0), ("high", 8, 0), ("low", 4, 0)]]
    assert tested.p_vs_none_holm.min() == pytest.approx(min(3 * tested.p_vs_none.min(), 1))


# --------------------------------------------------------------------------- the job
def _files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ("results.csv", "heads.csv")}


def _same_job(a: Path, b: Path) -> None:
    """The draw ``a`` of a K-draw job is the single-seed job ``b``: files byte-equal, and
    the records agree on everything but bookkeeping."""
    assert _files(a) == _files(b)
    ra, rb = read_record(a), read_record(b)
    for key in ("config_hash", "settings", "heads", "n_correct", "mechanism", "control_seed",
                "results_sha256"):
        assert getattr(ra, key) == getattr(rb, key), key


@pytest.mark.parametrize("ablation", ["zero", "mean", "resample"])
def test_k_draws_equal_the_single_seed_jobs(tmp_path, ablation):
    """The K-draw job's draws (mechanism check on, 10 stories, three checkpoint chunks of
    two batches) equal single-seed jobs run on their own with a cache of their own: the
    shared model, data, means, donors and tokenized rows change nothing. Resample's donors
    are taken once for the union of the draws' heads and cut per draw. Each single-seed
    job starts as in a fresh process (the evaluator's once-per-process check of its
    shortcuts runs again on its first batch, which must not change that batch's numbers)."""
    from ih_sweep.evaluation.fastpath import check

    args = (*FAST, f"ablation={ablation}", "eval.checkpoint_items=4", "data.n_stories=10",
            "mechanism.n_texts=8", "eval.batch_size=2", "eval.cpu_workers=2")
    parent = run_job(tmp_path / "k" / "job", *args, "control_seeds=3",
                     f"paths.cache_dir={tmp_path}/ck")
    assert isinstance(parent, SeedsRecord) and parent.control_seeds == [0, 1, 2]
    assert read_record(tmp_path / "k" / "job") == parent
    assert {"model", "data", "scores", "rows", "prompt_lengths"} <= set(parent.shared)
    if ablation == "mean":
        assert "fill" in parent.shared  # the means, once
    if ablation == "resample":  # the donors of the union, once; none taken again
        assert "donors" in parent.shared
    heads = set()
    for seed in range(3):
        single = tmp_path / "single" / str(seed)
        check.reset()
        record = run_job(single, *args, f"control_seed={seed}", f"paths.cache_dir={tmp_path}/c1")
        assert not record.reused_evaluation
        _same_job(tmp_path / "k" / "job" / f"control_seed={seed}", single)
        assert record.config_hash == parent.seed_hashes[seed]
        heads.add(tuple(map(tuple, record.heads)))
    assert len(heads) == 3  # three different draws


def test_control_seeds_is_ignored_outside_random_and_hashes_as_one_draw():
    def cfg(*o):
        return settings(compose(*o))
    assert config_hash(cfg("condition=high", "control_seeds=20")) == config_hash(cfg())
    one = config_hash(cfg("condition=random", "control_seed=2"))
    assert config_hash(cfg("condition=random", "control_seed=2", "control_seeds=1")) == one
    assert config_hash(cfg("condition=random", "control_seed=2", "control_seeds=5")) != one
    many = cfg("condition=random", "control_seed=2", "control_seeds=3")
    assert [config_hash(c) for c in draws.seed_configs(many)] == [
        config_hash(cfg("condition=random", f"control_seed={k}")) for k in (2, 3, 4)]
    from ih_sweep.config.errors import ConfigError
    with pytest.raises(ConfigError, match="control_seeds=0 is not allowed"):
        cfg("condition=random", "control_seeds=0")


def test_a_killed_k_job_resumes_at_the_draw_it_reached(tmp_path, caplog):
    """Kill between draws, simulated: the last draw's files, its stored copy and the
    parent record are gone. The rerun evaluates that draw only; a single-seed job then
    reuses any draw from the store, and a K-job reuses single-seed jobs."""
    cache = f"paths.cache_dir={tmp_path}/c"
    job = tmp_path / "k" / "job"
    first = run_job(job, *FAST, "control_seeds=3", cache)
    kept = {k: (job / f"control_seed={k}" / "job.json").read_bytes() for k in (0, 1)}
    last = job / "control_seed=2"
    results = (last / "results.csv").read_bytes()
    shutil.rmtree(last)
    shutil.rmtree(store_dir(f"{tmp_path}/c", first.seed_hashes[2]))
    (job / "job.json").unlink()
    caplog.set_level("INFO")
    again = run_job(job, *FAST, "control_seeds=3", cache)
    assert again.reused == [0, 1]
    assert {k: (job / f"control_seed={k}" / "job.json").read_bytes() for k in (0, 1)} == kept
    assert (last / "results.csv").read_bytes() == results
    assert caplog.text.count("complete results exist for this config") == 2
    single = run_job(tmp_path / "single", *FAST, "control_seed=1", cache)
    assert single.reused_evaluation and single.config_hash == first.seed_hashes[1]
    assert _files(tmp_path / "single") == _files(job / "control_seed=1")
    # the other way: draws 1..3, of which 1 and 2 are stored; only 3 is evaluated
    later = run_job(tmp_path / "k2" / "job", *FAST, "control_seed=1", "control_seeds=3", cache)
    assert later.reused == [1, 2] and later.control_seeds == [1, 2, 3]


def test_find_jobs_lists_the_draws_and_keeps_the_parent_apart(tmp_path):
    sweep = tmp_path / "sweep"
    job = sweep / "condition=random,control_seeds=2"
    run_job(job, *FAST, "control_seeds=2", f"paths.cache_dir={tmp_path}/c")
    (job / ".hydra").mkdir()
    (job / ".hydra" / "config.yaml").write_text("{}\n")
    found = find_jobs(sweep)
    assert found.problems == [] and found.seed_parents == [job]
    assert sorted(j.path.name for j in found.jobs) == ["control_seed=0", "control_seed=1"]
    shutil.rmtree(job / "control_seed=1")
    found = find_jobs(sweep)
    assert [p for p, _ in found.problems] == [job.name]
    assert "control_seed=1" in found.problems[0][1]


def test_union_of_donor_heads_stays_within_the_budget(monkeypatch):
    shared = draws.SharedInputs(pending=[0, 1, 2, 3])
    heads = {0: [(0, 1), (0, 2)], 1: [(0, 2), (1, 3)], 2: [(1, 4), (1, 5)], 3: [(1, 6)]}
    monkeypatch.setattr(draws, "DONOR_SHARE_BYTES", 4 * 10)
    assert shared.union(heads[0], 0, heads.get, 10) == [(0, 1), (0, 2), (1, 3)]
    assert shared.union(heads[2], 2, heads.get, 10) == [(1, 4), (1, 5), (1, 6)]
    monkeypatch.setattr(draws, "DONOR_SHARE_BYTES", 0)  # this draw's heads at least
    assert shared.union(heads[1], 1, heads.get, 10) == heads[1]


def test_donor_bytes_count_the_dtype_head_outputs_are_stored_in():
    """nf4 rounds its matmuls in bfloat16, but the tiny model's head outputs (the o_proj
    input, what resample's donors hold) stay float32: 4 bytes an element in the budget."""
    pytest.importorskip("bitsandbytes")
    import torch

    from ih_sweep.ablation.donors import donor_bytes_per_head
    from ih_sweep.config.schema import ModelConfig, Quantization, QuantizationConfig
    from ih_sweep.model.architecture import head_sites
    from ih_sweep.model.loading import load_model

    model, tok = load_model(ModelConfig(name="tiny", path="builtin:tiny"),
                            QuantizationConfig(name=Quantization.nf4), "cpu")
    seen = []
    sites = head_sites(model)
    hook = sites.out_proj[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    with torch.no_grad():
        model(**tok(["Mary went to the office."], return_tensors="pt"))
    hook.remove()
    texts = {0: "Mary went to the office.", 1: "John went to the hallway. Mary went home."}
    longest = max(len(ids) for ids in tok(list(texts.values()))["input_ids"])
    assert seen == [torch.float32]
    assert donor_bytes_per_head(model, tok, texts) == 2 * longest * sites.head_dim * 4


def test_donor_subset_equals_donors_taken_for_those_heads(tiny):
    from ih_sweep.ablation.donors import donor_texts, resample_donors
    from ih_sweep.ablation.means import position_means, reference_batches
    from ih_sweep.data import generate_stories, make_items

    model, tok = tiny
    items = make_items(generate_stories(6, seed=3), "last")
    means = position_means(model, reference_batches(tok, items, 6, model))
    texts, needed = donor_texts(tok, items, 3)
    union = [(1, 5), (0, 3), (1, 2), (0, 7)]
    whole = resample_donors(model, tok, texts, union, 0, means, needed)
    part = [(1, 2), (0, 7)]
    alone = resample_donors(model, tok, texts, part, 0, means, needed)
    cut = whole.subset(part)
    assert cut.donor_of == alone.donor_of and sorted(cut.heads) == sorted(alone.heads)
    assert sorted(cut.values) == sorted(alone.values) == [0, 1]
    for layer in alone.values:
        assert cut.columns[layer].tolist() == alone.columns[layer].tolist()
        assert bool((cut.values[layer] == alone.values[layer]).all())
    assert whole.covers(part) and not alone.covers(union)


# --------------------------------------------------------------------------- other family
def test_a_k_job_on_a_random_weight_model_of_another_family(tmp_path):
    from families import family_configs, save_model

    folder = save_model(family_configs()["gpt2"], tmp_path / "gpt2")
    args = (*FAST, "model=hub", f"model.path={folder}", "n_heads=2", "data.n_stories=8",
            "mechanism.n_texts=4", "scoring.n_sequences=2")
    parent = run_job(tmp_path / "k", *args, "control_seeds=3", f"paths.cache_dir={tmp_path}/c")
    assert parent.control_seeds == [0, 1, 2] and "model" in parent.shared
    single = run_job(tmp_path / "one", *args, "control_seed=2", f"paths.cache_dir={tmp_path}/d")
    _same_job(tmp_path / "k" / "control_seed=2", tmp_path / "one")
    assert json.loads((tmp_path / "k" / "job.json").read_text())["job"] == "random_seeds"
    assert single.n_items == 8


# --------------------------------------------------------------------------- the CLI
@pytest.mark.slow
def test_cli_sweep_with_k_draws_gets_p_and_band(tmp_path):
    """``-m n_heads=8 condition=high,none,random control_seeds=5``: 3 jobs, the random one
    writing 5 draws; the summary (exit 0: no job left out, no folder reported broken)
    compares ``high`` with them."""
    from compose_config import cli

    sweep = tmp_path / "s"
    proc = cli("-m", "n_heads=8", "condition=high,none,random", "control_seeds=5",
               "data.n_stories=20", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path}/c",
               "eval.progress=false")
    assert "left out" not in proc.stderr
    parent = sweep / "condition=random,control_seeds=5,data.n_stories=20,n_heads=8"
    assert read_record(parent).control_seeds == [0, 1, 2, 3, 4]
    df = pd.read_csv(sweep / "summary.csv")
    assert sorted(df[df.condition == "random"].control_seed) == [0, 1, 2, 3, 4]
    high = df[df.condition == "high"].iloc[0]
    null = df.loc[df.condition == "random", "accuracy"].to_numpy()
    assert high.n_random == 5
    assert high.p_vs_random == pytest.approx(st.empirical_p(high.accuracy, null))
    assert (high.random_acc_p2_5, high.random_acc_p97_5) == pytest.approx(st.null_band(null))
    assert (sweep / "accuracy_vs_n.png").stat().st_size > 10_000


@pytest.mark.slow
def test_null_benchmark_smoke_run(tmp_path):
    """bench_null.py on 2 draws of 10 stories: each draw's results.csv is the same bytes
    from the K-draw job, a multirun and separate processes (each its process's first
    evaluation), and it reports the three timings."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_null.py"),
                           "--draws", "2", "--stories", "10", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "null.json").read_text())
    assert out["draws"] == 2 and set(out["wall_s"]) == {"one_job", "multirun", "processes"}


def test_draws_split_across_jobs_pool_into_one_null_each_draw_once(tmp_path):
    """A K-draw null split across jobs (SLURM array tasks or local processes):
    ``control_seed=0,2 control_seeds=3`` runs draws 0-2 and 2-4 as two jobs; the summary
    pools them into one null of the 5 distinct draws, the draw both jobs ran counted once
    (and said so), and the second job reuses that draw from the store."""
    from compose_config import cli

    sweep = tmp_path / "s"
    proc = cli("-m", "n_heads=8", "condition=high,none,random", "control_seed=0,2",
               "control_seeds=3", "data.n_stories=20", f"hydra.sweep.dir={sweep}",
               f"paths.cache_dir={tmp_path}/c", "eval.progress=false")
    assert "left out" not in proc.stderr
    second = read_record(sweep / "condition=random,control_seed=2,control_seeds=3,"
                         "data.n_stories=20,n_heads=8")
    assert second.control_seeds == [2, 3, 4] and second.reused == [2]
    df = pd.read_csv(sweep / "summary.csv")
    assert sorted(df[df.condition == "random"].control_seed) == [0, 1, 2, 3, 4]
    assert df[df.condition == "high"].iloc[0].n_random == 5
    assert "2 jobs evaluate random N=8 seed 2: one row" in (sweep / "summary.md").read_text()

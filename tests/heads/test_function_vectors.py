"""Function-vector head scores (ih_sweep.heads.function_vectors), the exclusion conditions
(ih_sweep.heads.selection) and their settings, cache and jobs."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from compose_config import compose

from ih_sweep.config.errors import ConfigError
from ih_sweep.config.hydra import settings
from ih_sweep.config.identity import config_hash
from ih_sweep.config.schema import (
    DataConfig,
    EvalConfig,
    PromptFormat,
    RankBy,
    Scope,
    ScoringConfig,
)
from ih_sweep.data import generate_stories, items_for, make_items
from ih_sweep.heads import function_vectors as fvm
from ih_sweep.heads import score_table
from ih_sweep.heads.scoring import ScoreFileError
from ih_sweep.heads.selection import SelectionError, excluded_heads, select_heads

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(fv_prompts=3, fv_mean_prompts=6)


@pytest.fixture(scope="module")
def items():
    return items_for(DataConfig(n_stories=40), EvalConfig())


@pytest.fixture(scope="module")
def result(tiny, items):
    model, tok = tiny
    return fvm.function_vector_scores(model, tok, items, ScoringConfig(**SMALL,
                                                                      fv_batch_size=16))


# --------------------------------------------------------------------------- reference
def _o_proj(model, layer):
    return model.model.layers[layer].self_attn.o_proj


def _final_z(model, tok, prompt):
    """Each layer's o_proj input at the final token, one prompt alone, plain hooks."""
    got = {}
    handles = [_o_proj(model, la).register_forward_pre_hook(
        lambda m, args, la=la: got.__setitem__(la, args[0][0, -1].clone()))
        for la in range(len(model.model.layers))]
    try:
        with torch.no_grad():
            logits = model(**tok(prompt, return_tensors="pt")).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    return got, logits


def _prob(model, tok, prompt, target, patch=None):
    """P(target) at the final token of ``prompt`` alone, optionally with (layer, head,
    value) written into the o_proj input's final token by a plain pre-hook."""
    handle = None
    if patch is not None:
        layer, head, value = patch
        d = value.numel()

        def hook(module, args):
            z = args[0].clone()
            z[0, -1, head * d:(head + 1) * d] = value
            return (z,)
        handle = _o_proj(model, layer).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            logits = model(**tok(prompt, return_tensors="pt")).logits[0, -1]
    finally:
        if handle is not None:
            handle.remove()
    return float(torch.softmax(logits.double(), -1)[target])


def _gold(tok, item):
    """Todd et al.'s get_answer_id: the tokens of prompt + answer past the prompt's."""
    source = tok(item.prompt)["input_ids"]
    return tok(item.prompt + item.target)["input_ids"][len(source)]


def test_aie_equals_a_one_head_one_prompt_reference(tiny, result):
    """Head means and indirect effects recomputed without the module: one prompt at a time,
    unpadded, full passes, one head patched by a plain hook on o_proj."""
    model, tok = tiny
    d = model.config.head_dim
    finals = [_final_z(model, tok, it.prompt) for it in result.mean_items]
    for (_, logits), it in zip(finals, result.mean_items):  # the correct-only filter
        assert int(logits.argmax()) == _gold(tok, it)
    means = {la: torch.stack([f[la] for f, _ in finals]).mean(0) for la in finals[0][0]}
    heads = [(0, 0), (1, 31), (1, 5), np.unravel_index(np.abs(result.aie).argmax(),
                                                        result.aie.shape)]
    for layer, head in heads:
        effects = []
        for c in result.corrupted:
            y = _gold(tok, c.item)
            value = means[layer][head * d:(head + 1) * d]
            effects.append(_prob(model, tok, c.corrupted, y, (layer, head, value))
                           - _prob(model, tok, c.corrupted, y))
        assert result.aie[layer, head] == pytest.approx(np.mean(effects), abs=1e-6)
    assert result.effects.shape == (3, 2, 32) and np.abs(result.aie).max() > 0


def test_the_batch_size_does_not_change_the_scores(tiny, items, result):
    model, tok = tiny
    one = fvm.function_vector_scores(model, tok, items, ScoringConfig(**SMALL,
                                                                      fv_batch_size=1))
    np.testing.assert_allclose(one.aie, result.aie, atol=1e-6, rtol=0)
    np.testing.assert_allclose(one.baseline, result.baseline, atol=1e-6, rtol=0)


def test_a_head_with_zero_output_columns_has_no_effect(tiny, items):
    model, tok = tiny
    zeroed = copy.deepcopy(model)
    d = zeroed.config.head_dim
    with torch.no_grad():
        _o_proj(zeroed, 1).weight[:, 3 * d:4 * d] = 0
    r = fvm.function_vector_scores(zeroed, tok, items, ScoringConfig(**SMALL))
    assert r.aie[1, 3] == 0.0 and (r.effects[:, 1, 3] == 0).all()
    assert np.count_nonzero(r.aie) > 32


# --------------------------------------------------------------------------- shuffles
def _fixed(answers, perm):
    return sum(answers[p] == answers[i] for i, p in enumerate(perm))


@pytest.mark.parametrize("answers,least", [
    (["a", "b", "c", "d"], 0), (["a", "a", "b", "b"], 0), (["a", "b", "a", "b", "a", "c"], 0),
    (["a", "a", "a", "b"], 2), (["x", "y"], 0)])
def test_shuffles_move_every_answer_where_that_is_possible(answers, least):
    for seed in range(20):
        perm = fvm.shuffled_order(answers, np.random.default_rng(seed))
        assert sorted(perm) == list(range(len(answers)))
        assert _fixed(answers, perm) == least
    # the constructive fallback (no draw allowed) still finds one
    perm = fvm.shuffled_order(["a", "a", "b", "b", "c", "c"], np.random.default_rng(0), draws=0)
    assert _fixed(["a", "a", "b", "b", "c", "c"], perm) == 0


def test_corrupted_prompts_change_the_demonstration_answers_only(items):
    pool, skipped = fvm.candidates(items, 0)
    assert len(pool) + sum(skipped.values()) == len(items) and len(pool) > 30
    assert set(skipped) == {"few_demos", "one_answer"}
    for c in pool:
        clean = fvm.demo_answer_spans(c.item.prompt)
        bad = fvm.demo_answer_spans(c.corrupted)
        a = [c.item.prompt[x:y] for x, y in clean]
        b = [c.corrupted[x:y] for x, y in bad]
        assert sorted(a) == sorted(b) and len(a) == c.item.examples_before
        assert sum(x == y for x, y in zip(a, b)) == c.fixed_points
        m = max(a.count(v) for v in a)
        assert c.fixed_points == max(0, 2 * m - len(a))  # none where avoidable
        assert c.corrupted.endswith(c.item.prompt[clean[-1][1]:])  # the asked part as it was
    assert [c.item for c in fvm.candidates(items, 0)[0]] == [c.item for c in pool]
    assert [c.item for c in fvm.candidates(items, 1)[0]] != [c.item for c in pool]


def test_prompts_with_fewer_than_two_demonstrations_or_one_answer_are_skipped():
    stories = items_for(DataConfig(n_stories=10), EvalConfig(scope=Scope.all))
    pool, skipped = fvm.candidates(stories, 0)
    assert skipped["few_demos"] == 20  # each story's first two questions
    assert all(c.item.examples_before >= 2 for c in pool)
    helm = items_for(DataConfig(n_stories=10), EvalConfig(format=PromptFormat.helm, n_shots=3))
    pool, _ = fvm.candidates(helm, 0)
    assert pool and all(len(fvm.demo_answer_spans(c.corrupted)) == 3 for c in pool)
    assert all(c.corrupted != c.item.prompt for c in pool)


def test_too_few_prompts_are_refused_in_one_line(tiny):
    model, tok = tiny
    few = make_items(generate_stories(5), "last")
    with pytest.raises(fvm.FunctionVectorError, match=r"fv_prompts = 125 prompts.*have 5 "):
        fvm.function_vector_scores(model, tok, few, ScoringConfig())


# --------------------------------------------------------------------------- selection
def test_exclusion_never_chooses_an_excluded_head_and_keeps_controls_layer_matched():
    rng = np.random.default_rng(0)
    for _ in range(50):
        rank = rng.random((4, 16))
        other = rng.random((4, 16))
        out = excluded_heads(other, 0.1)  # floor(6.4) = 6 heads
        assert len(out) == 6 and set(out) == {tuple(map(int, np.unravel_index(i, (4, 16))))
                                              for i in np.argsort(-other, None)[:6]}
        high = select_heads(rank, "high", 5, exclude=out)
        assert not set(high) & set(out)
        allowed = [(la, h) for la in range(4) for h in range(16) if (la, h) not in out]
        assert sorted(rank[h] for h in high) == sorted(rank[h] for h in allowed)[-5:]
        layers = sorted(la for la, _ in high)
        for cond in ("low", "random"):
            ctrl = select_heads(rank, cond, 5, control_seed=3, exclude=out)
            assert sorted(la for la, _ in ctrl) == layers
            assert not set(ctrl) & (set(out) | set(high))
    # no exclusion: exactly as before (the notebook's order)
    rank = rng.random((3, 5))
    assert select_heads(rank, "low", 4, exclude=[]) == select_heads(rank, "low", 4)
    assert excluded_heads(rank, 0.0) == [] and len(excluded_heads(rank, 0.14)) == 2


def test_exclusion_that_leaves_too_few_heads_is_refused():
    rank = np.arange(8.0).reshape(2, 4)
    with pytest.raises(SelectionError, match="heads left after excluding 4"):
        select_heads(rank, "high", 5, exclude=[(1, 0), (1, 1), (1, 2), (1, 3)])
    with pytest.raises(SelectionError, match="layer 1 has 0 heads outside"):
        select_heads(rank, "low", 3, exclude=[(1, 3)])  # layer 1 holds 3 of the top-3


# --------------------------------------------------------------------------- settings
@pytest.mark.parametrize("overrides,match", [
    (("scoring.rank_by=fv", "scoring.exclude_by=fv"), "scoring.exclude_by='fv'.*differ"),
    (("scoring.exclude_by=fv", "scoring.exclude_share=1.0"), "exclude_share=1.0"),
    (("scoring.exclude_by=fv", "scoring.exclude_share=-0.1"), "exclude_share=-0.1"),
    (("scoring.rank_by=fv", "eval=helm", "eval.n_shots=1"), "eval.n_shots=1.*n_shots >= 2"),
    (("scoring.exclude_by=fv", "eval=helm", "eval.n_shots=0"), "exclude_by=fv"),
    (("scoring.fv_prompts=0",), "scoring.fv_prompts=0"),
    (("scoring.fv_batch_size=0",), "scoring.fv_batch_size=0"),
    (("scoring=fv", "scoring.fv_reference=evaluated", "data.n_stories=124"),
     "data.n_stories=124 .*>= 125"),
    (("scoring=prefix_not_fv", "scoring.fv_reference=evaluated", "data.n_stories=50",
      "scoring.fv_prompts=10"), "data.n_stories=50 .*>= 110"),
    (("scoring=fv", "scoring.fv_prompts=301"),  # held out: 400 stories
     r"scoring.fv_prompts=301 .* = 401 prompts of the 400 held-out .* <= 400"),
])
def test_bad_fv_and_exclusion_settings_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        settings(compose(*overrides))


def test_enough_stories_for_fv_or_no_fv_needed_is_allowed():
    settings(compose("scoring=fv", "data.n_stories=10"))  # FV prompts: held-out stories
    settings(compose("scoring=fv", "scoring.fv_prompts=300"))  # 400: exactly enough
    settings(compose("scoring=fv", "scoring.fv_reference=evaluated",
                     "data.n_stories=125"))  # exactly enough
    evaluated = ("scoring=fv", "scoring.fv_reference=evaluated", "data.n_stories=10")
    settings(compose(*evaluated, "condition=none"))  # no heads chosen
    settings(compose(*evaluated, "eval.scope=all"))  # the job counts
    settings(compose("scoring=fv", "data.n_stories=10", "scoring.fv_prompts=4",
                     "scoring.fv_mean_prompts=6"))


def test_presets_and_hashes():
    assert settings(compose("scoring=fv")).scoring.rank_by == RankBy.fv
    sc = settings(compose("scoring=prefix_not_fv")).scoring
    assert (sc.rank_by, sc.exclude_by, sc.exclude_share) == ("prefix", "fv", 0.02)
    sc = settings(compose("scoring=fv_not_prefix")).scoring
    assert (sc.rank_by, sc.exclude_by) == ("fv", "prefix")
    base = config_hash(compose())
    # settings that choose nothing leave a job's hash alone
    for same in ("scoring.fv_prompts=3", "scoring.fv_seed=2", "scoring.exclude_share=0.1"):
        assert config_hash(compose(same)) == base, same
    for other in ("scoring=fv", "scoring=prefix_not_fv"):
        assert config_hash(compose(other)) != base, other
    assert config_hash(compose("scoring=fv", "scoring.fv_seed=2")) != \
        config_hash(compose("scoring=fv"))
    assert config_hash(compose("scoring=fv", "scoring.fv_batch_size=3")) == \
        config_hash(compose("scoring=fv"))


# --------------------------------------------------------------------------- cache, files
def _config(tmp_path, *overrides):
    return settings(compose(f"paths.cache_dir={tmp_path / 'cache'}", "scoring.n_sequences=4",
                            "data.n_stories=30", "scoring.fv_prompts=3",
                            "scoring.fv_mean_prompts=6", *overrides))


def test_fv_scores_are_cached_reused_and_keyed_by_the_prompts(tmp_path, tiny):
    calls = []

    def getter():
        calls.append(1)
        return tiny
    cfg = _config(tmp_path, "scoring=fv")
    df, path = score_table.get_scores(cfg, getter)
    assert path == score_table.fv_cache_path(cfg) and path.name.startswith("tiny-fv-")
    assert np.isfinite(df["fv"]).all() and np.isfinite(df["prefix"]).all() and calls
    assert (path.with_suffix(".png")).is_file() and path.with_name(path.name + ".sha256")
    effects = score_table.read_samples(path, (2, 32))  # [fv_prompts, layers, heads]
    assert effects.shape == (3, 2, 32)
    np.testing.assert_allclose(effects.mean(0).ravel(), df["fv"], rtol=0, atol=1e-15)
    np.testing.assert_allclose(effects.std(0, ddof=1).ravel() / np.sqrt(3), df["fv_se"])
    calls.clear()
    again, _ = score_table.get_scores(cfg, getter)
    assert not calls and np.array_equal(again["fv"], df["fv"])  # reused, model not loaded
    prefix_cfg = _config(tmp_path)
    assert score_table.cache_path(prefix_cfg) == score_table.cache_path(cfg)
    assert np.isnan(score_table.get_scores(prefix_cfg, getter)[0]["fv"]).all()
    for other in ("data.n_stories=31", "data.seed=1", "eval.scope=all", "scoring.fv_seed=1",
                  "scoring.fv_correct_only=false"):
        assert score_table.fv_cache_path(_config(tmp_path, "scoring=fv", other)) != path, other
    for same in ("scoring.seq_len=20", "scoring.fv_batch_size=2", "eval.metric=exact",
                 "scoring.exclude_by=prefix"):
        assert score_table.fv_cache_path(_config(tmp_path, "scoring=fv", same)) == path, same
    assert score_table.cache_path(_config(tmp_path, "scoring.fv_seed=3")) == \
        score_table.cache_path(prefix_cfg)  # FV settings leave the induction cache alone
    # a damaged table is recomputed
    damaged = pd.read_csv(path)
    damaged.loc[0, "fv"] = np.inf
    damaged.to_csv(path, index=False)
    assert score_table.problem_with_cache(path, 2, 32, fvm.FV_COLUMNS, ["fv"])
    calls.clear()
    fixed, _ = score_table.get_scores(cfg, getter)
    assert calls and np.allclose(fixed["fv"], df["fv"])


def test_a_score_file_with_an_fv_column_ranks_and_one_without_is_refused(tmp_path, caplog):
    rows = [(la, h, float(la * 32 + h), float(-h)) for la in range(2) for h in range(32)]
    with_fv = tmp_path / "with.csv"
    pd.DataFrame(rows, columns=["layer", "head", "prefix", "fv"]).to_csv(with_fv, index=False)
    cfg = _config(tmp_path, "scoring.source=file", f"scoring.file={with_fv}", "scoring=fv")
    df, path = score_table.get_scores(cfg, None)
    assert path is None
    mat = score_table.matrix_for(cfg, df, "fv")
    assert select_heads(mat, "high", 2) == [(0, 0), (1, 0)]
    cfg = _config(tmp_path, "scoring.source=file", f"scoring.file={with_fv}",
                  "scoring=fv_not_prefix", "scoring.exclude_share=0.05")
    out = score_table.exclusion(cfg, df)
    assert out == [(1, 31), (1, 30), (1, 29)]  # the top 3 (floor(0.05 x 64)) by prefix
    cfg = _config(tmp_path, "scoring.source=file", f"scoring.file={with_fv}",
                  "scoring=fv_not_prefix", "n_heads=10%")  # N as a share: logged as asked
    with caplog.at_level(logging.INFO, logger="ih_sweep"):
        assert score_table.exclusion(cfg, df) == [(1, 31)]
    assert "excluded from the top-10% by fv: the top 1 heads by prefix" in caplog.messages[-1]
    without = tmp_path / "without.csv"
    pd.DataFrame([r[:3] for r in rows], columns=["layer", "head", "prefix"]).to_csv(
        without, index=False)
    cfg = _config(tmp_path, "scoring.source=file", f"scoring.file={without}", "scoring=fv")
    df, _ = score_table.get_scores(cfg, None)
    with pytest.raises(ScoreFileError, match="no fv score in it"):
        score_table.matrix_for(cfg, df, "fv")


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_fv_and_exclusion_sweep_through_the_cli(tmp_path):
    """High-FV heads and induction heads outside the top FV heads, with their controls,
    in one sweep: two groups, the exclusion named in its title, no excluded head chosen."""
    proc = subprocess.run(
        [sys.executable, "-m", "ih_sweep", "-m", "scoring=fv,prefix_not_fv",
         "condition=high,low,none", "n_heads=8", "data.n_stories=30", "scoring.fv_prompts=4",
         "scoring.fv_mean_prompts=8", "scoring.exclude_share=0.1", "mechanism.enabled=false",
         "eval.progress=false", f"hydra.sweep.dir={tmp_path}/s",
         f"paths.cache_dir={tmp_path}/c"], cwd=ROOT, capture_output=True, text=True,
        timeout=900, env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin",
                          "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (tmp_path / "s" / "summary.md").read_text()
    titles = [line for line in summary.splitlines() if line.startswith("## model=")]
    assert len(titles) == 2
    assert any("rank_by=fv" in t and "exclude_by" not in t for t in titles)
    assert any("rank_by=prefix" in t and "scoring.exclude_by=fv, scoring.exclude_share=0.1"
               in t for t in titles)
    fv = pd.read_csv(next((tmp_path / "c" / "scores").glob("tiny-fv-*.csv")))
    top_fv = {(int(r.layer), int(r.head)) for r in fv.nlargest(6, "fv").itertuples()}
    for job in (tmp_path / "s").glob("*scoring=prefix_not_fv*"):
        record = json.loads((job / "job.json").read_text())
        if record["condition"] != "none":
            assert not {tuple(h) for h in record["heads"]} & top_fv
            assert len(record["heads"]) == 8
    # two score tables (the FV one, the induction one the exclusion arm ranks by): two
    # heatmaps, numbered in the order of their tables
    assert sorted(p.name[:-6] for p in (tmp_path / "s").glob("heads_*.png")) == \
        ["heads_fv", "heads_prefix"]
    assert {p.name[-5] for p in (tmp_path / "s").glob("heads_*.png")} == {"0", "1"}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "opt"])
def test_fv_scores_on_other_families(tmp_path, family):
    """Random-weight models: finite FV scores (correct_only off: they answer nothing
    right), batch-size invariant, and an evaluate job ranked by them."""
    from compose_config import run_job
    from families import CONFIGS, save_model

    from ih_sweep.config.schema import DType, ModelConfig, QuantizationConfig
    from ih_sweep.model.loading import load_model

    folder = save_model(CONFIGS[family], tmp_path / family)
    model, tok = load_model(ModelConfig(name=family, path=str(folder), dtype=DType.float32),
                             QuantizationConfig(), "cpu")
    from ih_sweep.data import load_stories
    from ih_sweep.data.heldout import heldout_items

    # the job's FV prompts: held-out stories (scoring.fv_reference=heldout)
    items, _ = heldout_items(DataConfig(n_stories=12), EvalConfig(),
                             load_stories(DataConfig(n_stories=12)))
    sc = dict(fv_prompts=3, fv_mean_prompts=4, fv_correct_only=False)
    a = fvm.function_vector_scores(model, tok, items, ScoringConfig(**sc, fv_batch_size=3))
    b = fvm.function_vector_scores(model, tok, items, ScoringConfig(**sc, fv_batch_size=64))
    assert a.aie.shape == (2, 4) and np.isfinite(a.aie).all() and np.abs(a.aie).max() > 0
    np.testing.assert_allclose(a.aie, b.aie, atol=1e-6, rtol=0)
    record = run_job(tmp_path / "job", "model=hub", f"model.path={folder}", "scoring=fv",
                     "n_heads=2", "data.n_stories=12", "scoring.fv_prompts=3",
                     "scoring.fv_mean_prompts=4", "scoring.fv_correct_only=false",
                     "scoring.n_sequences=2", "mechanism.enabled=false", "eval.progress=false")
    top = np.argsort(-a.aie, axis=None, kind="stable")[:2]
    assert record.heads == [[int(i // 4), int(i % 4)] for i in top]


@pytest.mark.slow
def test_the_score_job_writes_and_prints_fv_scores(tmp_path, caplog):
    from compose_config import run_job

    caplog.set_level("INFO")
    run_job(tmp_path / "job", "job=score", "scoring=fv", "debug=fast")
    df = pd.read_csv(tmp_path / "job" / "scores.csv")
    assert np.isfinite(df["fv"]).all() and np.isfinite(df["prefix"]).all() and len(df) == 64
    assert "top heads by fv" in caplog.text
    assert list((tmp_path / "cache" / "scores").glob("tiny-fv-*.csv"))

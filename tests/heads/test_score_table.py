"""The score table's cache: keyed by everything that makes the scores, checked when read,
recomputed (with a warning) when damaged; user tables checked against the model."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from compose_config import compose

from ih_sweep.config.hydra import settings
from ih_sweep.heads import score_table
from ih_sweep.heads.scoring import ScoreFileError
from ih_sweep.model.loading import ASSET_DIR


def _config(tmp_path, *overrides):
    return settings(compose(f"paths.cache_dir={tmp_path / 'cache'}", "scoring.n_sequences=4",
                            *overrides))


def test_the_cache_key_covers_what_makes_the_scores(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(ASSET_DIR, model)
    base = score_table.cache_path(_config(tmp_path, "model=hub", f"model.path={model}"))
    for other in (("model.dtype=bfloat16",), ("quantization=nf4",), ("scoring.seq_len=20",),
                  ("scoring.seed=1",), ("model.revision=abc",)):
        path = score_table.cache_path(_config(tmp_path, "model=hub", f"model.path={model}",
                                              *other))
        assert path != base, other
    for same in (("scoring.rank_by=combined",), ("scoring.batch_size=2",), ("model.name=x",)):
        path = score_table.cache_path(_config(tmp_path, "model=hub", f"model.path={model}",
                                              *same))
        assert path.name.split("-")[-1] == base.name.split("-")[-1], same
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert score_table.cache_path(_config(tmp_path, "model=hub", f"model.path={model}")) \
        == base  # touched, the same content: the same table
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        copy = tmp_path / name / "model"
        shutil.copytree(model, copy)
        content = bytearray((copy / name).read_bytes())
        content[-2] ^= 1
        (copy / name).write_bytes(content)
        (model / name).unlink()
        (model / name).symlink_to(copy / name)  # a file behind a symlink: its content counts
        assert score_table.cache_path(_config(tmp_path, "model=hub", f"model.path={model}")) \
            != base, name  # the same path, other weights or tokenizer: rescored
        (model / name).unlink()
        shutil.copyfile(ASSET_DIR / name, model / name)
        assert score_table.cache_path(_config(tmp_path, "model=hub", f"model.path={model}")) \
            == base, name


def _getter(tiny, calls):
    def get():
        calls.append(1)
        return tiny
    return get


def _damage(path, how):
    df = pd.read_csv(path)
    if how == "truncated":
        path.write_text(path.read_text()[:200])
    elif how == "nan row":
        df.loc[3, "prefix"] = np.nan
        df.to_csv(path, index=False)
    elif how == "duplicate row":
        pd.concat([df, df.head(1)]).to_csv(path, index=False)
    elif how == "no checksum":
        path.with_name(path.name + ".sha256").unlink()


@pytest.mark.parametrize("how", ["truncated", "nan row", "duplicate row", "no checksum"])
def test_a_damaged_cache_is_rescored_with_a_warning(tmp_path, tiny, caplog, how):
    config = _config(tmp_path)
    calls: list[int] = []
    first, path = score_table.get_scores(config, _getter(tiny, calls))
    _damage(path, how)
    caplog.set_level(logging.WARNING)
    again, _ = score_table.get_scores(config, _getter(tiny, calls))
    assert len(calls) == 2 and "rescoring: the cached table" in caplog.text
    pd.testing.assert_frame_equal(again, first)
    assert score_table.problem_with_cache(path, 2, 32) is None


def test_a_table_cached_before_the_standard_errors_is_rescored_not_crashed_on(
        tmp_path, tiny, caplog):
    from ih_sweep.pipeline.records import sha256

    config = _config(tmp_path)
    calls: list[int] = []
    first, path = score_table.get_scores(config, _getter(tiny, calls))
    samples = score_table.read_samples(path, (2, 32))
    assert samples.shape == (4, 2, 32)  # scoring.n_sequences=4
    np.testing.assert_allclose(samples.std(0, ddof=1) / 2,
                               first["prefix_se"].to_numpy().reshape(2, 32))
    old = pd.read_csv(path).drop(columns="prefix_se")  # as an older version wrote it
    old.to_csv(path, index=False)
    path.with_name(path.name + ".sha256").write_text(sha256(path) + "\n")
    score_table.samples_path(path).unlink()
    caplog.set_level(logging.WARNING)
    again, _ = score_table.get_scores(config, _getter(tiny, calls))
    assert len(calls) == 2 and "lacks the score columns" in caplog.text
    pd.testing.assert_frame_equal(again, first)
    assert score_table.read_samples(path, (2, 32)).shape == (4, 2, 32)


def test_missing_per_sample_scores_leave_the_stability_unknown(tmp_path, tiny, caplog):
    config = _config(tmp_path)
    _, path = score_table.get_scores(config, _getter(tiny, []))
    assert set(score_table.score_samples(config, (2, 32))) == {"prefix"}
    score_table.samples_path(path).unlink()
    caplog.set_level(logging.WARNING)
    assert score_table.score_samples(config, (2, 32)) == {}
    assert "stability is not known" in caplog.text
    assert score_table.read_samples(path, (3, 32)) is None


def test_a_good_cache_is_reused_its_heatmap_redrawn_and_stale_temporaries_removed(
        tmp_path, tiny):
    config = _config(tmp_path)
    calls: list[int] = []
    _, path = score_table.get_scores(config, _getter(tiny, calls))
    path.with_suffix(".png").unlink()
    stale = [path.parent / f".{name}.a_b9.tmp" for name in
             (path.name, path.name + ".sha256", path.with_suffix(".png").name,
              path.stem + ".samples.npy")]
    for tmp in stale:
        tmp.write_text("half a file")
    # another table's write in progress in the same folder, under that table's own lock
    others = [path.parent / f".{path.stem}_fv.csv.x1.tmp", path.parent / ".norms.csv.x2.tmp",
              path.parent / f".{path.name}x.x3.tmp"]
    for tmp in others:
        tmp.write_text("being written")
    score_table.get_scores(config, _getter(tiny, calls))
    assert len(calls) == 1 and path.with_suffix(".png").is_file()
    assert not any(tmp.exists() for tmp in stale) and all(tmp.exists() for tmp in others)


def test_a_read_only_cache_is_read(tmp_path, tiny, monkeypatch):
    """Root may write anywhere, so the folder's write access is what os.access reports."""
    config = _config(tmp_path)
    calls: list[int] = []
    first, path = score_table.get_scores(config, _getter(tiny, calls))
    real = os.access
    monkeypatch.setattr(score_table.os, "access",
                        lambda p, mode: False if str(p) == str(path.parent) else real(p, mode))
    again, _ = score_table.get_scores(config, _getter(tiny, calls))
    assert len(calls) == 1
    pd.testing.assert_frame_equal(again, first)
    _damage(path, "nan row")
    with pytest.raises(score_table.CacheError, match="is not usable .* not writable"):
        score_table.get_scores(config, _getter(tiny, calls))


@pytest.mark.parametrize("rows,match", [
    ([(99, 0), (99, 1)], r"layers up to 99 and heads up to 1, but the model has 2 layers x "
                         r"32 heads"),
    ([(0, h) for h in range(33)], "heads up to 32"),
    ([(0, h) for h in range(31)], "layer 0 has 31 of the model's 32 heads"),
])
def test_a_user_table_must_fit_the_model(rows, match):
    df = pd.DataFrame(rows, columns=["layer", "head"])
    with pytest.raises(ScoreFileError, match=match):
        score_table.check_scores_fit(df, 2, 32, "s.csv")


def test_a_table_of_some_layers_fits():
    df = pd.DataFrame([(1, h) for h in range(32)], columns=["layer", "head"])
    score_table.check_scores_fit(df, 2, 32, "s.csv")

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from ih_sweep.config import ConfigError, config_hash, validate
from ih_sweep.launch import config_dir


def cfg(*overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_defaults_validate():
    c = cfg()
    validate(c)
    assert c.model.name == "tiny" and c.data.name == "babi_generated"
    assert c.eval.metric == "contains" and c.eval.scope == "last"
    assert c.eval.cpu_workers == "auto"
    validate(cfg("eval.cpu_workers=3"))
    assert c.scoring.rank_by == "prefix" and c.ablation.method == "zero"


@pytest.mark.parametrize("override,match", [
    ("condition=best", r"condition='best' is not allowed; allowed values: high, low, random, none"),
    ("n_heads=-2", r"n_heads=-2 must be >= 0"),
    ("eval.metric=fuzzy", r"eval.metric='fuzzy' is not allowed; allowed values: contains, exact"),
    ("eval.scope=first", r"eval.scope='first' is not allowed; allowed values: last, all"),
    ("scoring.rank_by=best", r"scoring.rank_by='best'.*prefix, copying, combined"),
    ("ablation.method=resample", r"ablation.method='resample'.*zero, mean"),
    ("data.task=2", r"data.task=2 is not allowed; allowed values: 1"),
    ("quantization.name=int4", r"quantization.name='int4'.*none, nf4, int8"),
    ("task=train", r"task='train' is not allowed; allowed values: sweep, score, train_tiny"),
    ("eval.cpu_workers=0", r"eval.cpu_workers=0 must be >= 1"),
    ("eval.cpu_workers=many", r"eval.cpu_workers='many' is not allowed; allowed values: auto, "
                              r"or an integer >= 1"),
])
def test_bad_values_name_key_and_allowed_values(override, match):
    with pytest.raises(ConfigError, match=match):
        validate(cfg(override))


def test_files_config_checks_split_and_lang():
    with pytest.raises(ConfigError, match=r"data.split='dev'.*train, test"):
        validate(cfg("data=babi_files", "data.split=dev"))
    with pytest.raises(ConfigError, match=r"data.lang='fr'"):
        validate(cfg("data=babi_files", "data.lang=fr"))
    validate(cfg("data=babi_files", "data.task=20", "data.split=test"))


def test_hub_model_needs_a_path():
    with pytest.raises(ConfigError, match="model.path is missing"):
        validate(cfg("model=hub"))
    validate(cfg("model=hub", "model.path=EleutherAI/pythia-160m"))


def test_experiment_seed_replication_composes():
    c = cfg("experiment=seed_replication")
    validate(c)
    assert c.model.path == "Hugofernandez/Mistral-7B-v0.1-colab-sharded"
    assert c.quantization.name == "nf4" and c.quantization.double_quant
    assert c.n_heads == 16 and c.scoring.source == "file" and c.scoring.rank_by == "combined"
    assert c.data.name == "babi_hub" and c.data.lang == "en-10k" and c.data.split == "train"


def test_config_hash_ignores_speed_settings_only():
    base = config_hash(cfg())
    assert config_hash(cfg("eval.batch_size=3", "eval.progress=false")) == base
    assert config_hash(cfg("eval.cpu_workers=1")) == base
    assert config_hash(cfg("n_heads=4")) != base
    assert config_hash(cfg("data.n_stories=10")) != base

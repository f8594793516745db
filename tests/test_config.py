"""The config schema, composed in-process with Hydra's compose API (no subprocess)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from compose_config import CONF, compose
from hydra.errors import ConfigCompositionException

from ih_sweep.config import schema
from ih_sweep.config.schema import Condition, Config, ConfigError, Metric, config_hash, settings

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_compose_into_the_typed_schema():
    config = settings(compose())
    assert isinstance(config, Config)
    assert config.model.name == "tiny" and config.data.name == "babi_generated"
    assert config.eval.metric is Metric.contains and config.condition is Condition.high
    assert config.eval.cpu_workers == "auto" and config.eval.cpu_worker_count() is None
    assert settings(compose("eval.cpu_workers=3")).eval.cpu_worker_count() == 3
    assert config.scoring.rank_by == "prefix" and config.ablation.method == "zero"


@pytest.mark.parametrize("override", [
    "condition=best", "eval.metric=fuzzy", "eval.scope=first", "scoring.rank_by=best",
    "quantization.name=int4", "job=train", "eval.progress=maybe",  # ablation.method: registry
    "summarize=maybe", "model.attn_implementation=magic", "scoring.seed=abc",
    "eval.cpu_workers=1.5", "n_heads=1.5", "data.split=dev", "model.dtype=float8",
    "scan.layers=abc", "train.schedule=linear",
])
def test_wrong_types_and_values_are_refused_at_compose_time(override):
    with pytest.raises(ConfigCompositionException) as err:
        compose(override)
    key, _, value = override.partition("=")
    assert value in str(err.value.__cause__) or key.split(".")[-1] in str(err.value.__cause__)


@pytest.mark.parametrize("override,match", [
    ("+eval.max_new_token=1", r"eval.max_new_token=1 is not a config key; keys of eval: "
                              r"metric, scope, max_new_tokens"),
    ("+foo=bar", r"foo='bar' is not a config key; keys of the top level: job, n_heads"),
    ("+paths.cache=x", r"paths.cache='x' is not a config key; keys of paths: cache_dir"),
])
def test_unknown_keys_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        settings(compose(override))


@pytest.mark.parametrize("override,match", [
    ("n_heads=-2", r"n_heads=-2 is not allowed; allowed: an integer >= 0"),
    ("n_heads=abc", r"n_heads='abc' is not allowed; allowed: an integer >= 0 \(heads\), or a "
                    r"share of all the model's heads P% with 0 < P <= 100"),
    ("n_heads=0%", r"n_heads='0%' is not allowed; .* \(no ablation: n_heads=0 or "
                   r"condition=none\)"),
    ("data.task=2", r"data.task=2 is not allowed; allowed with data=babi_generated: 1"),
    ("eval.cpu_workers=0", r"eval.cpu_workers=0 is not allowed; allowed: auto, or an "
                           r"integer >= 1"),
    ("eval.cpu_workers=many", r"eval.cpu_workers='many' is not allowed"),
    ("eval.checkpoint_items=0", r"eval.checkpoint_items=0 is not allowed; allowed: an "
                                r"integer >= 1"),
    ("scoring.exclude_rare_frac=2.0", r"scoring.exclude_rare_frac=2.0 is not allowed; "
                                      r"allowed: 0 <= value < 1"),
    ("scoring.repeats=1", r"scoring.repeats=1 is not allowed; allowed: an integer >= 2"),
    ("scan.layers=[-1]", r"scan.layers\[\]=-1 is not allowed"),
    ("train.task_steps=-5", r"train.task_steps=-5 is not allowed"),
    ("train.repeat_len=[5,2]", r"train.repeat_len=\[5, 2\] is not allowed; allowed: \[min, "
                               r"max\]"),
    ("scoring.source=file", r"scoring.file=None is not allowed; scoring.source=file needs"),
])
def test_rules_across_fields_name_key_value_and_what_is_allowed(override, match):
    with pytest.raises(ConfigError, match=match):
        settings(compose(override))


def test_files_config_checks_task_and_lang():
    with pytest.raises(ConfigError, match=r"data.lang='fr' is not allowed; allowed: en, "):
        settings(compose("data=babi_files", "data.lang=fr"))
    with pytest.raises(ConfigError, match=r"data.task=21 is not allowed; allowed: 1 to 20"):
        settings(compose("data=babi_files", "data.task=21"))
    assert settings(compose("data=babi_files", "data.task=20", "data.split=test")).data.task == 20


def test_hub_model_needs_a_path():
    with pytest.raises(ConfigError, match="model.path is missing"):
        settings(compose("model=hub"))
    assert settings(compose("model=hub", "model.path=EleutherAI/pythia-160m")).model.name == \
        "EleutherAI/pythia-160m"


@pytest.mark.parametrize("group", ["model", "quantization", "data", "scoring", "ablation",
                                   "eval", "scan", "train", "debug"])
def test_every_option_of_every_group_composes(group):
    options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert options
    for option in options:
        extra = ["model.path=some/model"] if option == "hub" else []
        settings(compose(f"{group}={option}", *extra))


def test_notebook_replication_experiment_composes():
    config = settings(compose("experiment=notebook_replication"))
    assert config.model.path == "Hugofernandez/Mistral-7B-v0.1-colab-sharded"
    assert config.quantization.name == "nf4" and config.quantization.double_quant
    assert config.n_heads == 16 and config.scoring.source == "file"
    assert config.scoring.rank_by == "combined"
    assert config.data.name == "babi_hub" and config.data.lang == "en-10k"


def test_job_folder_names_leave_out_exactly_the_speed_keys():
    """One marking (metadata=SPEED in the schema) drives both the config hash and Hydra's
    override_dirname exclusions."""
    cfg = compose(return_hydra_config=True)
    excluded = list(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert excluded == schema.speed_keys()
    assert {"eval.batch_size", "eval.cpu_workers", "eval.progress", "eval.checkpoint_items",
            "eval.fast_layers", "scoring.batch_size", "device", "summarize",
            "paths.cache_dir", "scan.heads_per_pass", "train.seed"} <= set(excluded)
    assert not {"n_heads", "condition", "eval.metric", "data.n_stories"} & set(excluded)


def test_config_hash_ignores_every_speed_key_and_nothing_else():
    base = config_hash(compose())
    changed = {"eval.batch_size": 3, "eval.cpu_workers": 1, "eval.progress": False,
               "eval.checkpoint_items": 7, "eval.fast_layers": False, "scoring.batch_size": 2,
               "device": "cpu", "summarize": False, "paths.cache_dir": "/tmp/x",
               "scan.heads_per_pass": 4, "train.seed": 3}
    assert set(changed) <= set(schema.speed_keys())
    for key, value in changed.items():
        assert config_hash(compose(f"{key}={value}")) == base, key
    for override in ("n_heads=4", "data.n_stories=10", "condition=low", "eval.metric=exact",
                     "scoring.seq_len=20", "ablation=mean"):
        assert config_hash(compose(override)) != base, override
    assert config_hash(settings(compose())) == base  # the typed config hashes the same


def test_tiny_recipe_is_the_shipped_models():
    """The train group's values are the recipe the shipped weights were trained with."""
    shipped = json.loads((ROOT / "ih_sweep/assets/tiny/training.json").read_text())["settings"]
    recipe = schema.plain(settings(compose()).train)
    recipe.pop("out_dir")
    assert recipe == shipped


def test_importing_the_schema_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, ih_sweep.config.schema; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip()
    assert out == "False"


def test_settings_that_cannot_change_a_job_leave_its_hash_alone():
    """The control seed only matters for random heads; an unablated job is the same job
    whatever N, scoring or ablation would have chosen."""
    assert config_hash(compose("control_seed=3")) == config_hash(compose())
    assert config_hash(compose("condition=random", "control_seed=3")) != \
        config_hash(compose("condition=random"))
    none = config_hash(compose("condition=none", "n_heads=4"))
    for other in (("condition=none", "n_heads=16"), ("condition=none", "ablation=mean"),
                  ("condition=none", "scoring=combined"), ("condition=high", "n_heads=0"),
                  ("condition=low", "n_heads=0", "control_seed=2")):
        assert config_hash(compose(*other)) == none, other


def test_a_share_of_heads_composes_resolves_and_hashes_apart_from_its_count():
    """n_heads=3% composes as the string '3%' (Hydra's parser keeps it), passes the checks
    and resolves to 2 of the tiny model's 64 heads; n_heads=10% and n_heads=7 are
    different configs (kept simple: the hash is of what was asked), but an unablated job
    is the same job whatever share was asked."""
    from ih_sweep.heads.selection import resolve_n_heads

    config = settings(compose("n_heads=3%"))
    assert config.n_heads == "3%"
    assert resolve_n_heads(config.n_heads, 2, 32) == 2
    assert settings(compose("n_heads=0.5%")).n_heads == "0.5%"
    assert config_hash(compose("n_heads=10%")) != config_hash(compose("n_heads=7"))
    assert config_hash(compose("n_heads=10%")) != config_hash(compose("n_heads=3%"))
    none = config_hash(compose("condition=none", "n_heads=4"))
    assert config_hash(compose("condition=none", "n_heads=10%")) == none
    assert schema.folder_name("condition=high,n_heads=10%") == "condition=high,n_heads=10%"


def test_long_job_folder_names_stay_under_the_file_system_limit():
    """A 217-character model.path in the overrides: the folder name is shortened with a hash
    of the whole name (distinct names stay distinct), in bytes, UTF-8 included."""
    long = "model.path=/" + "very_long_folder/" * 12 + "x,n_heads=4"
    name = schema.folder_name(long)
    assert len(name.encode()) <= schema.MAX_FOLDER_BYTES and "/" not in name
    assert name != schema.folder_name(long.replace("n_heads=4", "n_heads=8"))
    assert schema.folder_name("condition=high,n_heads=4") == "condition=high,n_heads=4"
    assert len(schema.folder_name("data.lang=" + "ह" * 120).encode()) <= 200

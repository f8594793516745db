"""The config schema (ih_sweep.config.schema), composed in-process with Hydra's compose API
(no subprocess): the defaults, every group's options, and the values the types refuse
while Hydra composes. The rules, the identity, the Hydra glue and the errors have their own
test files (test_config_rules, test_config_identity, test_config_hydra, test_config_errors).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from compose_config import CONF, compose
from hydra.errors import ConfigCompositionException

from ih_sweep.config.hydra import settings
from ih_sweep.config.plain import plain
from ih_sweep.config.schema import Condition, Config, Metric

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_compose_into_the_typed_schema():
    config = settings(compose())
    assert isinstance(config, Config)
    assert config.model.name == "tiny" and config.data.name == "babi_generated"
    assert config.eval.metric is Metric.contains and config.condition is Condition.high
    assert config.eval.cpu_workers == "auto" and config.eval.cpu_worker_count() is None
    assert settings(compose("eval.cpu_workers=3")).eval.cpu_worker_count() == 3
    assert config.scoring.rank_by == "prefix" and config.ablation.method == "zero"


# (override, OmegaConf's message: the value and what is allowed). Each message names its key
# on a line of its own (full_key: ...), which the test checks too.
ENUM = "Invalid value '{}', expected one of [{}]"
NOT_BOOL = "Value '{}' is not a valid bool (type str)"
NOT_INT_OR_STR = "Value '{}' of type 'float' is incompatible with type hint 'Union[int, str]'"


@pytest.mark.parametrize("override,message", [
    ("condition=best", ENUM.format("best", "high, low, random, none")),
    ("eval.metric=fuzzy", ENUM.format("fuzzy", "contains, exact, quasi_exact, verbatim, "
                                               "helm_exact, prefix_exact, quasi_prefix_exact")),
    ("eval.scope=first", ENUM.format("first", "last, all")),
    ("scoring.rank_by=best", ENUM.format("best", "prefix, copying, combined, fv")),
    ("quantization.name=int4", ENUM.format("int4", "none, nf4, int8")),
    ("job=train", ENUM.format("train", "evaluate, score, scan, train_tiny")),
    ("eval.progress=maybe", NOT_BOOL.format("maybe")),
    ("summarize=maybe", NOT_BOOL.format("maybe")),
    ("model.attn_implementation=magic",
     ENUM.format("magic", "sdpa, eager, flash_attention_2, flex_attention")),
    ("scoring.seed=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
    ("eval.cpu_workers=1.5", NOT_INT_OR_STR.format("1.5")),
    ("n_heads=1.5", NOT_INT_OR_STR.format("1.5")),
    ("data.split=dev", ENUM.format("dev", "train, valid, test, generated")),
    ("model.dtype=float8", ENUM.format("float8", "auto, float32, bfloat16, float16")),
    # OmegaConf names the value's type here, not the value
    ("scan.layers=abc", "Invalid value assigned: str is not a ListConfig, list or tuple."),
    ("train.schedule=linear", ENUM.format("linear", "cosine, wsd")),
])
def test_wrong_types_and_values_are_refused_at_compose_time(override, message):
    """The key, the value given and what is allowed, all three in the message."""
    with pytest.raises(ConfigCompositionException) as err:
        compose(override)
    key, _, _ = override.partition("=")
    lines = [line.strip() for line in str(err.value.__cause__).splitlines()]
    assert lines[0] == message
    assert f"full_key: {key}" in lines


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


def test_tiny_recipe_is_the_shipped_models():
    """The train group's values are the recipe the shipped weights were trained with."""
    shipped = json.loads((ROOT / "ih_sweep/assets/tiny/training.json").read_text())["settings"]
    recipe = plain(settings(compose()).train)
    recipe.pop("out_dir")
    assert recipe == shipped


@pytest.mark.parametrize("module", ["schema", "errors", "identity", "rules", "hydra"])
def test_importing_the_config_does_not_import_torch(module):
    import subprocess
    import sys

    code = f"import sys, ih_sweep.config.{module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip()
    assert out == "False"

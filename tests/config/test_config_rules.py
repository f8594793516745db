"""The rules the types cannot say (ih_sweep.config.rules): one function a group, each
refusal naming the key, the value given and what is allowed."""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import pytest
from compose_config import compose

from ih_sweep.config import rules
from ih_sweep.config.errors import ConfigError
from ih_sweep.config.hydra import settings
from ih_sweep.config.schema import (
    DataConfig,
    EvalConfig,
    MechanismConfig,
    ModelConfig,
    PromptFormat,
    ScanConfig,
    TrainConfig,
)

N_HEADS = ("allowed: an integer >= 0 (heads), or a share of all the model's heads P% with "
           "0 < P <= 100, e.g. 1%, 0.5% (no ablation: n_heads=0 or condition=none)")


@pytest.mark.parametrize("overrides,message", [
    (("n_heads=-2",), f"n_heads=-2 is not allowed; {N_HEADS}"),
    (("n_heads=abc",), f"n_heads='abc' is not allowed; {N_HEADS}"),
    (("n_heads=0%",), f"n_heads='0%' is not allowed; {N_HEADS}"),
    (("data.task=2",), "data.task=2 is not allowed; allowed with data=babi_generated: 1 (use "
                       "data=babi_files for tasks 1-20)"),
    (("eval.cpu_workers=0",), "eval.cpu_workers=0 is not allowed; allowed: auto, or an "
                              "integer >= 1"),
    (("eval.cpu_workers=many",), "eval.cpu_workers='many' is not allowed; allowed: auto, or an "
                                 "integer >= 1"),
    (("eval.checkpoint_items=0",), "eval.checkpoint_items=0 is not allowed; allowed: an "
                                   "integer >= 1"),
    (("eval.layer_store_mb=-1",), "eval.layer_store_mb=-1 is not allowed; allowed: auto, or an "
                                  "integer >= 0 (0: off)"),
    (("eval.layer_store_mb=lots",), "eval.layer_store_mb='lots' is not allowed; allowed: auto, "
                                    "or an integer >= 0 (0: off)"),
    (("scoring.exclude_rare_frac=2.0",), "scoring.exclude_rare_frac=2.0 is not allowed; "
                                         "allowed: 0 <= value < 1"),
    (("scoring.repeats=1",), "scoring.repeats=1 is not allowed; allowed: an integer >= 2"),
    (("scan.layers=[-1]",), "scan.layers[]=-1 is not allowed; allowed: an integer >= 0"),
    (("train.task_steps=-5",), "train.task_steps=-5 is not allowed; allowed: an integer >= 0"),
    (("train.repeat_len=[5,2]",), "train.repeat_len=[5, 2] is not allowed; allowed: [min, "
                                  "max] with 1 <= min <= max"),
    (("scoring.source=file",), "scoring.file=None is not allowed; scoring.source=file needs "
                               "the path of a score CSV or the notebook's pickle"),
    (("data=babi_files", "data.lang=fr"), "data.lang='fr' is not allowed; allowed: en, en-10k, "
                                          "hn, hn-10k, shuffled, shuffled-10k, en-valid, "
                                          "en-valid-10k"),
    (("data=babi_files", "data.task=21"), "data.task=21 is not allowed; allowed: 1 to 20"),
    (("control.norm_factor=1",), "control.norm_factor=1.0 is not allowed; allowed: a number > "
                                 "1 (the ratio a drawn head's output norm may differ from its "
                                 "top head's, either way)"),
])
def test_rules_across_fields_name_key_value_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError) as err:
        settings(compose(*overrides))
    assert str(err.value) == message


def test_files_config_takes_any_task_and_split():
    assert settings(compose("data=babi_files", "data.task=20", "data.split=test")).data.task == 20


def test_each_group_is_checked_by_its_own_function():
    """The group functions take the group's dataclass and say the same as check()."""
    cases = [
        (rules.check_model, ModelConfig(name="m", path=" "),
         "model.path=' ' is not allowed; allowed: a hub id (org/name), a local model folder, "
         "or builtin:tiny"),
        (rules.check_model, ModelConfig(name="m", path="org/m", device_map="gpu"),
         "model.device_map='gpu' is not allowed; allowed: null, auto, balanced, "
         "balanced_low_0, sequential, cpu, cuda, cuda:<index>"),
        (rules.check_data, DataConfig(lang="fr"),
         "data.lang='fr' is not allowed; it applies to data=babi_files and data=babi_hub only "
         "(the generator makes task 1 stories of its own)"),
        (rules.check_eval, EvalConfig(format=PromptFormat.notebook, n_shots=2),
         "eval.n_shots=2 is not allowed; eval.format=notebook shows a story's earlier "
         "questions instead of demos; allowed: 0 (demos: eval=helm or eval=lm_eval)"),
        (rules.check_eval, EvalConfig(stop=["\n", "\n\n"]),
         "eval.stop=['\\n', '\\n\\n'] is not allowed; '\\n' is part of '\\n\\n': the cut would "
         "then depend on the order of the list; allowed: stop strings none of which can "
         "overlap another"),
        (rules.check_mechanism, MechanismConfig(icl_window=0),
         "mechanism.icl_window=0 is not allowed; allowed: an integer >= 1"),
        (rules.check_scan, ScanConfig(layers=[]),
         "scan.layers=[] is not allowed; allowed: null (every layer) or a non-empty list of "
         "layer indices"),
        (rules.check_train, TrainConfig(heads=6, kv_heads=4),
         "train.kv_heads=4 is not allowed; allowed: a divisor of train.heads=6 (grouped-query "
         "attention)"),
    ]
    for check, group, message in cases:
        with pytest.raises(ConfigError) as err:
            check(group)
        assert str(err.value) == message, check.__name__
    config = settings(compose())
    for check, group, _ in cases:
        field = {"check_model": "model", "check_data": "data", "check_eval": "eval",
                 "check_mechanism": "mechanism", "check_scan": "scan",
                 "check_train": "train"}[check.__name__]
        with pytest.raises(ConfigError) as whole:
            rules.check(replace(config, **{field: group}))
        with pytest.raises(ConfigError) as alone:
            check(group)
        assert str(whole.value) == str(alone.value)


def test_cross_group_rules_read_the_whole_config():
    config = settings(compose("ablation=resample"))
    with pytest.raises(ConfigError) as err:
        rules.check_ablation(replace(config, data=replace(config.data, n_stories=1)))
    assert str(err.value) == ("ablation.method='resample' is not allowed; resample needs donor "
                              "stories: data.n_stories=1 leaves none (at least 2)")


def test_the_first_bad_group_in_field_order_is_named():
    """check() runs the groups in Config's order: a bad model is named before a bad train."""
    config = settings(compose())
    bad = replace(config, model=replace(config.model, name=""),
                  train=replace(config.train, lr=0.0))
    with pytest.raises(ConfigError, match=r"^model\.name=''"):
        rules.check(bad)
    with pytest.raises(ConfigError, match=r"^train\.lr=0\.0 is not allowed; allowed: a number "
                                          r"> 0$"):
        rules.check(replace(bad, model=config.model))


@pytest.mark.parametrize("value,share", [(0, None), (8, None), ("3%", Fraction(3)),
                                         ("0.5%", Fraction(1, 2)), ("100%", Fraction(100)),
                                         (".5%", Fraction(1, 2))])
def test_n_heads_share_reads_the_decimal_string(value, share):
    assert rules.n_heads_share(value) == share


@pytest.mark.parametrize("value", [-1, "101%", "0%", "3", "abc", True, "1e1%"])
def test_n_heads_share_refuses_what_is_neither_a_count_nor_a_share(value):
    with pytest.raises(ConfigError) as err:
        rules.n_heads_share(value)
    assert str(err.value) == f"n_heads={value!r} is not allowed; {N_HEADS}"


def test_overlapping_stops():
    assert rules.overlapping_stops(["\n", "Question:"]) is None
    assert rules.overlapping_stops(["ab", "b"]) == "'b' is part of 'ab'"
    assert rules.overlapping_stops(["ab", "bc"]) == "the end of 'ab' can begin 'bc'"


@pytest.mark.parametrize(("overrides", "message"), [
    (("data.split=train",), "data.split='train' is not allowed; it applies to data=babi_files "
     "and data=babi_hub only (the generator makes task 1 stories of its own)"),
    (("data=babi_files", "data.split=generated"), "data.split='generated' is not allowed; "
     "allowed with data=babi_files: train, valid, test (generated names the built-in "
     "generator's stories)"),
])
def test_the_split_is_generated_for_the_generator_and_a_release_split_for_files(overrides,
                                                                                message):
    """issue #33: the config says data.split=generated where the summary does; a release
    split is for files and the hub."""
    assert settings(compose()).data.split.value == "generated"
    assert settings(compose("data=babi_hub")).data.split.value == "train"
    with pytest.raises(ConfigError) as err:
        settings(compose(*overrides))
    assert str(err.value) == message

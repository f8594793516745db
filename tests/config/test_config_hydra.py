"""The Hydra glue (ih_sweep.config.hydra): the schema in the ConfigStore, the resolvers,
and the composed config turned into the typed, checked Config."""

from __future__ import annotations

from pathlib import Path

import pytest
from compose_config import compose
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ih_sweep.config import identity
from ih_sweep.config.errors import ConfigError
from ih_sweep.config.hydra import register, settings
from ih_sweep.config.schema import GROUPS, Config

EVAL_KEYS = ("metric, scope, max_new_tokens, format, n_shots, demo_seed, demo_lang, stop, "
             "batch_size, cpu_workers, progress, checkpoint_items, fast_layers, layer_store_mb")
TOP_KEYS = ("job, n_heads, condition, control_seed, control_seeds, control, device, summarize, "
            "paths, model, quantization, data, scoring, ablation, eval, mechanism, scan, train")


@pytest.mark.parametrize("override,message", [
    ("+eval.max_new_token=1", f"eval.max_new_token=1 is not a config key; keys of eval: "
                              f"{EVAL_KEYS}"),
    ("+foo=bar", f"foo='bar' is not a config key; keys of the top level: {TOP_KEYS}"),
    ("+paths.cache=x", "paths.cache='x' is not a config key; keys of paths: cache_dir"),
])
def test_unknown_keys_are_refused(override, message):
    with pytest.raises(ConfigError) as err:
        settings(compose(override))
    assert str(err.value) == message


def test_hub_model_needs_a_path():
    with pytest.raises(ConfigError) as err:
        settings(compose("model=hub"))
    assert str(err.value) == ("model.path is missing; give a hub id or a local folder, e.g. "
                              "model.path=EleutherAI/pythia-160m")
    assert settings(compose("model=hub", "model.path=EleutherAI/pythia-160m")).model.name == \
        "EleutherAI/pythia-160m"


def test_settings_leaves_hydras_node_out_and_checks_the_rules():
    config = settings(compose(return_hydra_config=True))
    assert isinstance(config, Config) and config == settings(compose())
    with pytest.raises(ConfigError, match=r"^n_heads=-1 is not allowed; "):
        settings(compose("n_heads=-1"))


def test_job_folder_names_leave_out_exactly_the_speed_keys():
    """One marking (metadata=SPEED in the schema) drives both the config hash and Hydra's
    override_dirname exclusions (the ih_sweep.speed_keys resolver)."""
    cfg = compose(return_hydra_config=True)
    excluded = list(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert excluded == identity.speed_keys()
    assert {"eval.batch_size", "eval.cpu_workers", "eval.progress", "eval.checkpoint_items",
            "eval.fast_layers", "scoring.batch_size", "device", "summarize",
            "paths.cache_dir", "scan.heads_per_pass", "train.seed"} <= set(excluded)
    assert not {"n_heads", "condition", "eval.metric", "data.n_stories"} & set(excluded)


def test_register_stores_every_group_once_and_can_run_again():
    register()
    register()  # the resolvers are registered once; a second call changes nothing
    repo = ConfigStore.instance().repo
    assert "base_config.yaml" in repo
    for group in GROUPS:
        assert "base.yaml" in repo[group], group
    assert OmegaConf.has_resolver("ih_sweep.speed_keys")
    assert OmegaConf.has_resolver("path_safe")


def test_the_help_lists_every_config_group_option_and_no_internal_name():
    """--help's group list (conf/hydra/help/ih_sweep.yaml) names exactly the options
    Hydra can compose for each group, the default first, without the schema's internal
    ``base`` node; the launchers are listed too."""
    import re

    import yaml
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ih_sweep.cli import config_dir

    conf = Path(config_dir())
    template = yaml.safe_load((conf / "hydra" / "help" / "ih_sweep.yaml").read_text())["template"]
    block = template[template.index("== Config groups"):template.index("== Examples")]
    listed = {}
    for line in re.sub(r",\n\s+", ", ", block).splitlines()[1:]:
        group, _, options = line.strip().partition(": ")
        if group:
            listed[group] = [re.sub(r" \(.*", "", o).strip() for o in options.split(", ")]
    defaults = {k: v for d in yaml.safe_load((conf / "config.yaml").read_text())["defaults"]
                if isinstance(d, dict) for k, v in d.items()}
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for group, options in listed.items():
            known = set(loader.get_group_options(group)) - {"base"}
            shown = [o for o in options if o != "(none)"]
            if group == "hydra/launcher":
                assert set(shown) <= known and {"resilient", "slurm"} <= set(shown), shown
                continue
            assert set(shown) == known, (group, shown, sorted(known))
            default = defaults.get(group)
            assert options[0] == ("(none)" if default is None else default), (group, options)
    assert set(listed) >= {"model", "quantization", "data", "scoring", "ablation", "eval",
                           "debug", "experiment", "scan", "train", "hydra/launcher"}
    assert "base" not in block

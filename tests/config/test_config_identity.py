"""What names a job (ih_sweep.config.identity): the semantic config and its hash, the speed
keys left out of both, and job folder names."""

from __future__ import annotations

import pytest
from compose_config import compose

from ih_sweep.config import identity
from ih_sweep.config.hydra import settings
from ih_sweep.config.identity import config_hash, semantic_config
from ih_sweep.config.plain import plain

TEXT = ("mechanism.icl_tokens=text",)


@pytest.mark.parametrize("overrides,digest", [
    # the bundled model's ICL score on answer tokens (mechanism.icl_tokens=auto, #31)
    ((), "18e517e18763cdf3"),
    (("condition=none",), "1fec320b0f717f59"),
    # below, the ICL score on the stories' own text (TEXT): the hashes of before #31
    (TEXT, "e15c4f7e1ab83e4c"),
    (("n_heads=4", *TEXT), "c521f4a7e425b1cb"),
    (("ablation=mean", *TEXT), "1340d564b2e792ec"),  # held-out reference prompts (#30)
    (("ablation=mean", "ablation.reference=evaluated", *TEXT),
     "002e2d11db220faf"),  # as before
    (("condition=none", *TEXT), "48e3c4bfffbd0a10"),
    (("condition=random", "control_seeds=3", *TEXT), "4584089c4c195f0c"),
    (("quantization=nf4", *TEXT), "0d5d0affbb4b1682"),
    (("scoring=combined", "scoring.exclude_by=prefix", *TEXT), "0a4a87ecc0ca5e1e"),
    (("scoring.rank_by=fv", "eval=helm", "eval.n_shots=2", *TEXT),
     "3f7da95ea20b6497"),  # held out
    (("scoring.rank_by=fv", "eval=helm", "eval.n_shots=2", "scoring.fv_reference=evaluated",
      *TEXT), "b091782ead241a78"),  # the FV prompts the evaluated ones: the hash of before #30
    (("n_heads=10%", *TEXT), "8e41d7166717f4ea"),
])
def test_config_hashes_are_pinned(overrides, digest):
    """A job's hash names its finished folder and its results; a change of the hash makes
    every earlier sweep look unfinished, so these are pinned (composed and typed alike)."""
    cfg = compose(*overrides)
    assert config_hash(cfg) == digest
    assert config_hash(settings(cfg)) == digest


def test_config_hash_ignores_every_speed_key_and_nothing_else():
    base = config_hash(compose())
    changed = {"eval.batch_size": 3, "eval.cpu_workers": 1, "eval.progress": False,
               "eval.checkpoint_items": 7, "eval.fast_layers": False, "eval.layer_store_mb": 0,
               "scoring.batch_size": 2,
               "device": "cpu", "summarize": False, "paths.cache_dir": "/tmp/x",
               "scan.heads_per_pass": 4, "train.seed": 3}
    assert set(changed) <= set(identity.speed_keys())
    for key, value in changed.items():
        assert config_hash(compose(f"{key}={value}")) == base, key
    for override in ("n_heads=4", "data.n_stories=10", "condition=low", "eval.metric=exact",
                     "scoring.seq_len=20", "ablation=mean"):
        assert config_hash(compose(override)) != base, override
    assert config_hash(settings(compose())) == base  # the typed config hashes the same


def test_speed_keys_are_the_fields_marked_speed_leaves_only():
    keys = identity.speed_keys()
    assert {"eval.batch_size", "eval.cpu_workers", "eval.progress", "eval.checkpoint_items",
            "eval.fast_layers", "scoring.batch_size", "scoring.fv_batch_size", "device",
            "summarize", "paths.cache_dir", "scan.heads_per_pass", "mechanism.batch_size",
            "train.seed", "train.out_dir"} <= set(keys)
    assert "train" not in keys and "paths" not in keys  # whole groups: their leaves
    assert not {"n_heads", "condition", "eval.metric", "data.n_stories"} & set(keys)


def test_semantic_config_leaves_out_hydra_and_speed_keys():
    semantic = semantic_config(compose(return_hydra_config=True))
    assert "hydra" not in semantic and "paths" not in semantic and "train" not in semantic
    assert "batch_size" not in semantic["eval"] and "device" not in semantic
    assert semantic == semantic_config(compose())


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


def test_the_control_match_changes_only_a_norm_matched_random_job():
    """control.match=layer (the default) is today's draw: every job hashes as before the key
    existed (the pinned hashes above); layer_norm and its factor name another random job,
    and the conditions that draw nothing ignore both, as they ignore control_seed."""
    random = config_hash(compose("condition=random"))
    assert config_hash(compose("condition=random", "control.match=layer",
                               "control.norm_factor=3")) == random
    norm = config_hash(compose("condition=random", "control.match=layer_norm"))
    assert norm != random
    assert config_hash(compose("condition=random", "control.match=layer_norm",
                               "control.norm_factor=3")) not in (norm, random)
    for condition in ("high", "low", "none"):
        assert config_hash(compose(f"condition={condition}", "control.match=layer_norm")) == \
            config_hash(compose(f"condition={condition}")), condition
    assert settings(compose("control.match=layer_norm")).control.match == "layer_norm"


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
    assert identity.folder_name("condition=high,n_heads=10%") == "condition=high,n_heads=10%"


def test_long_job_folder_names_stay_under_the_file_system_limit():
    """A 217-character model.path in the overrides: the folder name is shortened with a hash
    of the whole name (distinct names stay distinct), in bytes, UTF-8 included."""
    long = "model.path=/" + "very_long_folder/" * 12 + "x,n_heads=4"
    name = identity.folder_name(long)
    assert len(name.encode()) <= identity.MAX_FOLDER_BYTES and "/" not in name
    assert name != identity.folder_name(long.replace("n_heads=4", "n_heads=8"))
    assert identity.folder_name("condition=high,n_heads=4") == "condition=high,n_heads=4"
    assert len(identity.folder_name("data.lang=" + "ह" * 120).encode()) <= 200
    assert identity.folder_name("") == "default"


def test_plain_gives_plain_data():
    config = settings(compose())
    data = plain(config.quantization)
    assert data == {"name": "none", "double_quant": True, "compute_dtype": "bfloat16"}
    assert type(data["name"]) is str


def _omegaconf_plain(node):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(node), resolve=True, enum_to_str=True)


@pytest.mark.parametrize("overrides", [
    (), ("condition=none",), ("n_heads=10%",), ("ablation=mean",), ("ablation=resample",),
    ("ablation=knockout",), ("eval=helm",), ("eval=lm_eval",), ("eval=notebook",),
    ("quantization=nf4",), ("quantization=int8",), ("scoring=combined",), ("scoring=fv",),
    ("condition=random", "control_seeds=3", "control.match=layer_norm"),
    ("model=hub", "model.path=EleutherAI/pythia-160m", "model.dtype=bfloat16"),
    ("data.n_stories=7", "scan.layers=[0,1]", "eval.layer_store_mb=0"),
    ("experiment=notebook_replication",),
])
def test_plain_reads_typed_settings_as_omegaconf_does(overrides):
    """plain() reads a typed config directly (no OmegaConf node): the same data, types and
    key order as OmegaConf's own conversion, for every group option; so hashes and
    job.json's settings cannot tell the two apart."""
    config = settings(compose(*overrides))
    for node in (config, config.eval, config.scoring, config.mechanism, config.paths):
        fast, reference = plain(node), _omegaconf_plain(node)
        assert repr(fast) == repr(reference)


def test_plain_lets_omegaconf_convert_what_needs_converting():
    """Values OmegaConf would convert or resolve (an int in a float field, a tuple for a
    list, an interpolation, a str for an Enum) are not read directly: the result is still
    OmegaConf's."""
    import ih_sweep.config.plain as reader

    config = settings(compose())
    config.mechanism.exclude_rare_frac = 0  # float field, int value: OmegaConf gives 0.0
    with pytest.raises(reader._NeedsOmegaConf):
        reader._read(config.mechanism)
    assert plain(config.mechanism)["exclude_rare_frac"] == 0.0
    assert type(plain(config.mechanism)["exclude_rare_frac"]) is float
    config = settings(compose())
    config.condition = "high"  # an Enum field given its name
    assert plain(config) == _omegaconf_plain(config)
    config.model.name = "${condition}-run"  # an interpolation: OmegaConf resolves it
    assert plain(config)["model"]["name"] == "high-run"
    config = settings(compose("scan.layers=[0,1]"))
    config.scan.layers = (0, 1)  # a tuple for a list
    assert plain(config.scan) == _omegaconf_plain(config.scan)
    assert plain(config.scan)["layers"] == [0, 1]

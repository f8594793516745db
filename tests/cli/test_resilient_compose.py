"""A job's config made from a sibling job's (``compose_from_sibling`` in
``hydra_plugins/ih_sweep_launcher/resilient.py``) is the config Hydra composes for it:
the same YAML (interpolations unresolved, Hydra's own node included), the same flags, and
the same resolved app config; where the overrides differ in more than plain values, Hydra
composes."""

from __future__ import annotations

import pytest
from compose_config import CONF
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import OmegaConf

from hydra_plugins.ih_sweep_launcher import resilient
from ih_sweep.config.hydra import register

SWEEP = ["hydra.sweep.dir=/tmp/ih_sweep_compose_test", "paths.cache_dir=/tmp/c"]


def _jobs(*values: list[str]) -> list[list[str]]:
    """Every combination of the given key=value lists, in the order Hydra lists jobs."""
    import itertools

    return [list(c) for c in itertools.product(*values)]


CASES = {
    "default sweep": _jobs(["n_heads=4", "n_heads=8", "n_heads=16"],
                           ["condition=high", "condition=low", "condition=none"]),
    "a group and values": _jobs(["ablation=zero", "ablation=mean"], ["n_heads=4", "n_heads=8"]),
    "nested and string values": _jobs(["eval.progress=false", "eval.progress=true"],
                                      ["mechanism.seq_len=20", "mechanism.seq_len=25"],
                                      ["n_heads=10%", "n_heads=4"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_sibling_made_config_is_what_hydra_composes(name, monkeypatch):
    register()
    jobs = CASES[name]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("config", overrides=list(SWEEP),
                                           run_mode=RunMode.MULTIRUN)
        real = [loader.load_sweep_config(master, [*job, "paths.cache_dir=/tmp/c"])
                for job in jobs]
        made = []
        siblings = []
        original = resilient.compose_from_sibling

        def counted(*args, **kwargs):
            config = original(*args, **kwargs)
            siblings.append(config is not None)
            return config

        monkeypatch.setattr(resilient, "compose_from_sibling", counted)
        resilient.compose_each_job_once(loader)
        try:
            made = [loader.load_sweep_config(master, [*job, "paths.cache_dir=/tmp/c"])
                    for job in jobs]
        finally:
            del loader.load_sweep_config  # the instance's own attribute: Hydra's method again
    assert any(siblings), "no job was made from a sibling"
    if name == "a group and values":
        assert not all(siblings), "a job of another ablation group was not composed"
    for want, got in zip(real, made):
        assert OmegaConf.to_yaml(got) == OmegaConf.to_yaml(want)
        assert OmegaConf.is_struct(got) == OmegaConf.is_struct(want)
        assert OmegaConf.is_readonly(got.hydra) == OmegaConf.is_readonly(want.hydra)
        app = {k: v for k, v in want.items() if k != "hydra"}
        assert {k: v for k, v in got.items() if k != "hydra"} == app
        assert OmegaConf.to_container(got.hydra.job) == OmegaConf.to_container(want.hydra.job)


def test_only_the_first_jobs_check_is_frozen_without_a_collection(monkeypatch, tmp_path):
    """check_all_jobs: the first job's check (which imports torch and transformers) runs in
    long_lived(collect=False), frozen as it is; the other jobs' checks make garbage only
    (their composed configs), left to the collector: a sweep of many jobs freezes none of
    theirs."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from ih_sweep.model import runtime

    entered = []

    @contextmanager
    def spy(collect=True):
        entered.append(collect)
        yield False

    monkeypatch.setattr(runtime, "long_lived", spy)
    register()
    jobs = CASES["default sweep"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration(
            "config", overrides=[f"hydra.sweep.dir={tmp_path}/sweep",
                                 f"paths.cache_dir={tmp_path}/cache"],
            run_mode=RunMode.MULTIRUN)
        launcher = SimpleNamespace(hydra_context=SimpleNamespace(config_loader=loader),
                                   config=master)
        resilient.check_all_jobs(launcher, jobs)
    assert entered == [False]

"""The registry of ablation methods (ih_sweep.ablation.registry): names, errors, and a
method of this file's own, registered here alone and run through an evaluate job."""

from __future__ import annotations

import pandas as pd
import pytest
from compose_config import compose, run_job

from ih_sweep.ablation.registry import (
    Ablation,
    AblationError,
    BaseAblation,
    ablation_names,
    get_ablation,
    register_ablation,
    unregister_ablation,
)
from ih_sweep.config.errors import ConfigError
from ih_sweep.config.hydra import settings

FAST = ("debug=fast", "n_heads=16", "mechanism.enabled=false")


def test_the_built_in_methods_are_registered_in_order():
    assert ablation_names()[:5] == ["zero", "mean", "position_mean", "resample", "knockout"]
    for name in ablation_names():
        method = get_ablation(name)
        assert isinstance(method, Ablation) and method.name == name
    assert get_ablation("resample").row_dependent and get_ablation("resample").per_head
    assert get_ablation("position_mean").needs_positions
    assert not get_ablation("zero").needs_positions and not get_ablation("mean").row_dependent
    assert get_ablation("resample").mechanism_unmeasured is not None
    assert get_ablation("knockout").edits_attention and not get_ablation("zero").edits_attention


def test_an_unknown_method_is_refused_in_one_line_naming_the_registered_ones():
    with pytest.raises(AblationError, match=r"^ablation.method='shuffle' is not a registered "
                                            r"ablation method; allowed values: zero, mean, "
                                            r"position_mean, resample, knockout$"):
        get_ablation("shuffle")
    with pytest.raises(ConfigError, match=r"^ablation.method='shuffle' is not allowed; "
                                          r"allowed: zero, mean, position_mean, resample, "
                                          r"knockout$"):
        settings(compose("ablation.method=shuffle"))


def test_a_name_cannot_be_registered_twice():
    with pytest.raises(AblationError, match=r"ablation method 'mean' is already registered "
                                            r"\(by ih_sweep.ablation.mean.Mean\)"):
        @register_ablation("mean")
        class Other(BaseAblation):
            pass
    assert type(get_ablation("mean")).__module__ == "ih_sweep.ablation.mean"


def test_a_class_that_is_not_a_method_is_refused():
    with pytest.raises(AblationError, match="does not implement the Ablation protocol"):
        @register_ablation("not_a_method")
        class Nothing:
            pass
    assert "not_a_method" not in ablation_names()


def test_the_config_rules_of_a_method_are_its_own():
    with pytest.raises(ConfigError, match=r"ablation.method='resample' is not allowed; "
                                          r"resample needs donor stories: data.n_stories=1"):
        settings(compose("ablation=resample", "data.n_stories=1"))
    with pytest.raises(ConfigError, match=r"ablation.method='mean' is not allowed; job=scan"):
        settings(compose("job=scan", "ablation=mean"))


# --------------------------------------------------------------------------- a new method
@pytest.fixture
def scaled():
    """A method of this file alone: the ablated heads' outputs halved. Registered with the
    decorator for the test, unregistered after it (the other tests see the built-ins only)."""
    seen: list[tuple[int, float]] = []

    @register_ablation("scaled")
    class Scaled(BaseAblation):
        """z times 0.5 on the ablated heads' columns; nothing to prepare."""

        def replace(self, fill, layer, z, columns, positions=None, keys=None, cache=None):
            new = z[..., columns.to(z.device)] * 0.5
            seen.append((layer, float(new.abs().sum())))
            return new

    yield seen
    unregister_ablation("scaled")


def test_a_method_registered_in_a_test_file_runs_an_evaluate_job(tmp_path, scaled):
    cache = f"paths.cache_dir={tmp_path}/c"
    assert settings(compose("ablation.method=scaled")).ablation.method == "scaled"
    record = run_job(tmp_path / "scaled", *FAST, "ablation.method=scaled", cache)
    assert record.ablation == "scaled" and len(record.heads) == 16
    assert scaled and {layer for layer, _ in scaled} == {la for la, _ in record.heads}
    assert any(total > 0 for _, total in scaled)  # the heads were halved, not zeroed
    zero = run_job(tmp_path / "zero", *FAST, "ablation.method=zero", cache)
    none = run_job(tmp_path / "none", *FAST, "condition=none", cache)
    assert zero.heads == record.heads and none.heads == []

    def logprobs(folder):
        return pd.read_csv(folder / "results.csv", keep_default_na=False)["gold_logprob"]

    half = logprobs(tmp_path / "scaled")
    assert (pd.read_csv(tmp_path / "scaled" / "results.csv")["ablation"] == "scaled").all()
    assert not half.equals(logprobs(tmp_path / "zero"))
    assert not half.equals(logprobs(tmp_path / "none"))
    assert "scaled" not in settings(compose()).ablation.method

"""The checks before any job (:mod:`ih_sweep.pipeline.preflight`): the list in its order,
and the random-sequence check (scoring's and the mechanism check's ``seq_len`` against
the model's positions and its tokenizer's candidate tokens), in-process and through the
real CLI, where a sweep is refused before its first job."""

from __future__ import annotations

from pathlib import Path

import pytest
from compose_config import ROOT, cli, compose
from preflight_refusals import refusal

from ih_sweep.heads.scoring import candidate_token_ids
from ih_sweep.model.loading import ASSET_DIR, local_tokenizer
from ih_sweep.pipeline import preflight

TINY_POSITIONS = 1024  # the bundled model's max_position_embeddings


def test_every_check_is_listed_once_in_order():
    names = [c.__name__ for c in preflight.CHECKS]
    assert len(names) == len(set(names))
    assert names[-1] == "check_random_sequences"  # after the model's own files are checked
    assert names.index("check_model_files") < names.index("check_random_sequences")


def _offered(frequent: float = 0.0, rare: float = 0.0) -> int:
    return len(candidate_token_ids(local_tokenizer(str(ASSET_DIR)), frequent, rare))


# (overrides, the message's expected fragment); the allowed bounds come from the bundled
# model's config.json and tokenizer, computed independently below
def _cases() -> list[tuple[list[str], str]]:
    half = _offered(0.5)
    rare = _offered(0.0, 0.9)
    return [
        (["job=score", "scoring.seq_len=400"],
         f"scoring.seq_len=400: a repeated sequence of 1 + 400 x 4 = 1601 tokens is longer "
         f"than the model's {TINY_POSITIONS} positions; allowed: seq_len <= "
         f"{(TINY_POSITIONS - 1) // 4}"),
        (["job=score", "scoring.exclude_frequent_frac=0.5", f"scoring.seq_len={half + 1}"],
         f"scoring.seq_len={half + 1}: a sequence of distinct random tokens this long needs "
         f"{half + 1} candidate tokens and the tokenizer offers {half} (after "
         f"scoring.exclude_*_frac); allowed: seq_len <= {half}"),
        (["condition=high", "scoring.seq_len=300"], "scoring.seq_len=300: a repeated sequence"),
        (["mechanism.seq_len=600"],
         "mechanism.seq_len=600: a repeated sequence of 1 + 600 x 2 = 1201 tokens is longer "
         f"than the model's {TINY_POSITIONS} positions; allowed: seq_len <= "
         f"{(TINY_POSITIONS - 1) // 2}"),
        (["mechanism.exclude_rare_frac=0.9", f"mechanism.seq_len={rare + 1}"],
         f"the tokenizer offers {rare} (after mechanism.exclude_*_frac); allowed: "
         f"seq_len <= {rare}"),
        (["job=scan", "scoring.seq_len=300"], "scoring.seq_len=300: a repeated sequence"),
    ]


@pytest.mark.parametrize("index", range(6))
def test_sequences_that_cannot_be_drawn_are_refused_before_any_job(index):
    overrides, expected = _cases()[index]
    got = refusal(*overrides)
    assert got.startswith("config error: "), got
    assert expected in got, got


def test_the_bounds_themselves_are_accepted():
    half = _offered(0.5)
    assert refusal("job=score", "scoring.seq_len=255") == "accepted"
    assert refusal("job=score", "scoring.exclude_frequent_frac=0.5",
                   f"scoring.seq_len={half}") == "accepted"
    assert refusal(f"mechanism.seq_len={min(511, _offered())}") == "accepted"


def test_settings_a_job_does_not_use_are_not_checked():
    # no scores computed: the unablated model, or heads from a score file
    assert refusal("condition=none", "mechanism.enabled=false",
                   "scoring.seq_len=400") == "accepted"
    # the mechanism check switched off
    assert refusal("condition=none", "mechanism.enabled=false",
                   "mechanism.seq_len=600") == "accepted"


def test_the_tokenizer_is_read_once_per_state_of_its_folder(tmp_path):
    import shutil

    folder = tmp_path / "tiny"
    shutil.copytree(ASSET_DIR, folder)
    first = local_tokenizer(str(folder))
    assert local_tokenizer(str(folder)) is first
    (folder / "extra.txt").write_text("a file more: the folder's state changed\n")
    assert local_tokenizer(str(folder)) is not first


def test_cli_sweep_with_a_bad_mechanism_seq_len_runs_no_job(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # this checkout, run from elsewhere
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    sweep = tmp_path / "sweep"
    proc = cli("-m", "n_heads=4,8", "condition=high,low", "mechanism.seq_len=600", "debug=fast",
               f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}",
               cwd=tmp_path, check=False)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines == ["ih_sweep: config error: mechanism.seq_len=600: a repeated sequence of "
                     "1 + 600 x 2 = 1201 tokens is longer than the model's 1024 positions; "
                     "allowed: seq_len <= 511 (all 4 jobs); none of the sweep's 4 jobs ran"],\
        lines
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not list(tmp_path.rglob("job.json")), "a job ran"
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.csv"))


def census_cases(tmp_path: Path) -> list[tuple[str, list[str]]]:
    """Every refusal of this module as (name, CLI arguments), for
    scripts/bad_inputs_census.py."""
    return [(" ".join(o), list(o)) for o, _ in _cases()]


def test_the_job_refuses_with_the_words_of_the_checks_before_it(tiny):
    """The checks inside a job (the mechanism check's and scoring's own, for a job run
    without the CLI) and those before any job share one rule
    (:func:`ih_sweep.heads.scoring.check_repeated_sequences`): the same line."""
    from ih_sweep.config.errors import ConfigError
    from ih_sweep.config.hydra import settings
    from ih_sweep.heads.score_table import check_sequences_fit
    from ih_sweep.pipeline.mechanism import repeat_inputs

    _, tokenizer = tiny

    def mechanism(config):
        return repeat_inputs(tokenizer, config.mechanism, TINY_POSITIONS)

    rare = f"mechanism.seq_len={_offered(0, 0.9) + 1}"
    for overrides, inside in ((["mechanism.seq_len=600"], mechanism),
                              (["mechanism.exclude_rare_frac=0.9", rare], mechanism),
                              (["job=score", "scoring.seq_len=400"], check_sequences_fit)):
        before = refusal(*overrides)
        with pytest.raises(ConfigError) as err:
            inside(settings(compose("debug=fast", *overrides)))
        assert before == f"config error: {err.value}"

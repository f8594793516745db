"""Held-out reference prompts (issue #30 item 4): the stories the reference means and the
FV scores are taken on share no story with the evaluated ones."""

from __future__ import annotations

import pytest
from compose_config import compose
from conftest import FIXTURES

from ih_sweep import data
from ih_sweep.config.hydra import settings
from ih_sweep.config.schema import DataConfig, EvalConfig
from ih_sweep.data import heldout


def _texts(stories):
    return {heldout.story_text(s) for s in stories}


def test_generated_held_out_stories_are_disjoint_from_the_evaluated_ones():
    cfg = DataConfig(n_stories=1000)
    evaluated = data.load_stories(cfg)
    held, where = heldout.heldout_stories(cfg, evaluated)
    assert len(held) == heldout.HELDOUT_STORIES and "seed 2000000" in where
    assert _texts(held).isdisjoint(_texts(evaluated))
    assert held == [s for s in data.generate_stories(heldout.HELDOUT_STORIES, 2_000_000)
                    if heldout.story_text(s) not in _texts(evaluated)]
    # a story that happens to repeat an evaluated one's text is dropped
    again, _ = heldout.heldout_stories(cfg, [*evaluated, held[0]])
    assert held[0] not in again and len(again) == len(held) - 1


def _files(tmp_path, *splits):
    root = tmp_path / "babi" / "en"
    root.mkdir(parents=True)
    for split in splits:
        (root / f"qa1_single-supporting-fact_{split}.txt").write_text(
            (FIXTURES / "qa1_tiny.txt").read_text())
    return str(tmp_path / "babi")


def test_file_held_out_stories_follow_the_evaluated_ones_or_come_from_train(tmp_path):
    path = _files(tmp_path, "test", "train")
    everything = data.load_stories(DataConfig(name="babi_files", path=path, lang="en",
                                              split="test", n_stories=None))
    assert len(everything) >= 2
    cfg = DataConfig(name="babi_files", path=path, lang="en", split="test", n_stories=1)
    held, where = heldout.heldout_stories(cfg, everything[:1])
    assert held == everything[1:] and "after the first 1" in where
    whole = DataConfig(name="babi_files", path=path, lang="en", split="test", n_stories=None)
    # the train file here is the test file's copy: every story is an evaluated one's text
    with pytest.raises(data.DataError, match=r"^data.n_stories=None: .* allowed: .*"
                                             r"reference=evaluated$"):
        heldout.heldout_stories(whole, everything)


def test_reference_items_are_held_out_unless_evaluated_is_asked():
    items = data.make_items(data.generate_stories(3, 0))
    other = data.make_items(data.generate_stories(2, 9))
    both = heldout.EvaluatedItems(items, other)
    assert list(both) == items
    assert heldout.reference_items(both, "heldout") == other
    assert heldout.reference_items(both, "evaluated") is both
    assert heldout.reference_items(items, "heldout") is items  # a plain list: as given
    with pytest.raises(ValueError, match="not made"):
        heldout.reference_items(heldout.EvaluatedItems(items), "heldout")


@pytest.mark.parametrize("overrides,made", [
    (("ablation=mean",), True), (("ablation=position_mean",), True),
    (("ablation=resample",), True), (("scoring=fv",), True), ((), False),
    (("ablation=mean", "ablation.reference=evaluated"), False),
    (("scoring=fv", "scoring.fv_reference=evaluated"), False),
    (("ablation=mean", "condition=none"), False),
])
def test_jobs_make_held_out_items_when_a_statistic_needs_them(overrides, made):
    from ih_sweep.heads.score_table import fv_items
    from ih_sweep.pipeline.stages import load_items, reference_prompts

    config = settings(compose("debug=fast", *overrides))
    loaded = load_items(config)
    assert (loaded.items.heldout is not None) == made
    if made:
        evaluated = {it.prompt for it in loaded.items}
        assert evaluated.isdisjoint(it.prompt for it in loaded.items.heldout)
        assert _texts(loaded.stories).isdisjoint(
            _texts(heldout.heldout_stories(config.data, loaded.stories)[0]))
        assert "heldout" in reference_prompts(config).values()
    if "scoring=fv" in overrides:
        got = fv_items(config, loaded.items)
        assert got is (loaded.items.heldout if made else loaded.items)


def test_held_out_items_are_made_in_the_jobs_format():
    cfg, ev = DataConfig(n_stories=5), EvalConfig(format="helm", n_shots=2)
    evaluated = data.load_stories(cfg)
    items, _ = heldout.heldout_items(cfg, ev, evaluated)
    assert items == data.items_for(cfg, ev, heldout.heldout_stories(cfg, evaluated)[0])
    assert "Passage:" in items[0].prompt and items[0].examples_before == 2

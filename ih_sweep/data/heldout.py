"""Held-out reference prompts: the statistics of the unablated model that an ablation or a
ranking is computed from are taken on stories disjoint from the evaluated ones.

What is taken on them (``reference=heldout``, the default): the reference means of mean,
position-wise mean and resample ablation (``ablation.reference``,
:mod:`ih_sweep.ablation.means`) and the FV scores' prompts (``scoring.fv_reference``,
:mod:`ih_sweep.heads.function_vectors`). With ``evaluated`` they are taken on the evaluated
prompts themselves (in-sample, as before issue #30). Resample's donors stay evaluated
stories (each story's donor is another evaluated story, by design).

The held-out stories (:func:`heldout_stories`), :data:`HELDOUT_STORIES` at most:

- ``data=babi_generated``: generated with seed ``data.seed`` + :data:`HELDOUT_SEED_OFFSET`
  (the demo pool's is ``data.seed`` + 1,000,000, :data:`ih_sweep.data.DEMO_SEED_OFFSET`);
- ``data=babi_files`` / ``babi_hub``: the stories of the evaluated file after the first
  ``data.n_stories``; where the job evaluates the whole file, the train file of the same
  language and task when the evaluated split is not train; else none (refused, one line).

Stories whose text equals an evaluated story's are dropped, so the two sets share no
story. The held-out items are made as the evaluated ones are (:func:`items_for`, the same
format, scope and demos).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from ih_sweep.config.schema import (  # noqa: F401 (HELDOUT_STORIES: named here too)
    HELDOUT_STORIES,
    DataConfig,
    DataSource,
    EvalConfig,
    Reference,
    Split,
)
from ih_sweep.data.prompts import Item, items_for
from ih_sweep.data.sources import DataError, Story, generate_stories, load_stories

log = logging.getLogger(__name__)

HELDOUT_SEED_OFFSET = 2_000_000  # generator: the held-out stories' seed is data.seed + this


def story_text(story: Story) -> tuple[str, ...]:
    """What makes two stories the same story: their lines' text."""
    return tuple(story["text"])


def heldout_stories(data: DataConfig, evaluated: Sequence[Story]) -> tuple[list[Story], str]:
    """Stories disjoint from ``evaluated`` (module docstring) and where they come from, in
    words. Raises :class:`~ih_sweep.data.sources.DataError` where the data has none."""
    if data.name == DataSource.babi_generated:
        seed = data.seed + HELDOUT_SEED_OFFSET
        pool = generate_stories(HELDOUT_STORIES, seed, data.task)
        where = f"{HELDOUT_STORIES} generated stories of seed {seed}"
    else:
        everything = load_stories(dataclasses.replace(data, n_stories=None))
        pool = everything[len(evaluated):len(evaluated) + HELDOUT_STORIES]
        where = f"the stories of data.split={data.split} after the first {len(evaluated)}"
        if not pool and data.split != Split.train:
            from ih_sweep.data.prompts import demo_stories

            train, source = demo_stories(dataclasses.replace(data, split=Split.train))
            pool, where = train[:HELDOUT_STORIES], f"the first stories of {source}"
    seen = {story_text(s) for s in evaluated}
    kept = [s for s in pool if story_text(s) not in seen]
    if not kept:
        raise DataError(f"data.n_stories={data.n_stories}: the job evaluates every story of "
                        f"data.split={data.split}, so no held-out story is left for the "
                        "reference prompts (ablation.reference / scoring.fv_reference="
                        "heldout); allowed: a smaller data.n_stories, another data.split, or "
                        "reference=evaluated")
    return kept, f"{len(kept)} of {where}"


class EvaluatedItems(list):
    """The job's evaluated items (a list, in evaluation order) and the held-out items
    beside them (``heldout``: made from :func:`heldout_stories`; None where the job takes
    no statistic on them)."""

    def __init__(self, items: Sequence[Item], heldout: Sequence[Item] | None = None,
                 where: str | None = None):
        super().__init__(items)
        self.heldout = None if heldout is None else list(heldout)
        self.where = where


def heldout_items(data: DataConfig, ev: EvalConfig, evaluated: Sequence[Story]
                  ) -> tuple[list[Item], str]:
    """The held-out items (:func:`heldout_stories` as prompts of ``ev``'s format) and where
    they come from."""
    stories, where = heldout_stories(data, evaluated)
    items = items_for(data, ev, stories)
    log.info("reference prompts: %d held-out items of %s", len(items), where)
    return items, where


def reference_items(items: Sequence[Item], reference: Reference | str) -> Sequence[Item]:
    """The items a statistic is taken on: ``items.heldout`` for ``heldout`` (an
    :class:`EvaluatedItems` that holds them), else ``items`` themselves (``evaluated``, or a
    plain list of items given directly, as tests do). Raises ValueError where ``heldout``
    is asked of an :class:`EvaluatedItems` made without them (a pipeline bug)."""
    if str(reference) != Reference.heldout.value or not isinstance(items, EvaluatedItems):
        return items
    if items.heldout is None:
        raise ValueError("held-out reference items were asked for but not made")
    return items.heldout

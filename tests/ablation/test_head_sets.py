"""One head set a batch row (ih_sweep.ablation.hooks.ablate_head_sets): each row is what
ablate_heads gives it with its set alone, for the methods whose fill does not depend on the
row; the others are refused."""

from __future__ import annotations

import pytest
import torch

from ih_sweep import data
from ih_sweep.ablation.hooks import AblationError, ablate_head_sets, ablate_heads, head_sets
from ih_sweep.ablation.means import head_means, position_means, reference_batches
from ih_sweep.ablation.registry import head_set_methods
from ih_sweep.model.forward import ForwardContext

SETS = [[(0, 1), (1, 2)], [(0, 3)], [], [(1, 0), (1, 2), (0, 1)]]


@pytest.fixture(scope="module")
def setup(tiny):
    """The tiny model, a padded batch of 6 prompts (left-padded rows of several lengths) and
    the methods' fills over them."""
    model, tok = tiny
    items = data.make_items(data.generate_stories(6, seed=5), "last")
    batches = reference_batches(tok, items, 6, model, batch_size=6)
    fills = {"zero": None, "mean": head_means(model, batches),
             "position_mean": position_means(model, batches)}
    enc = batches[0]
    return model, enc["input_ids"], enc["attention_mask"], fills


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("method", ["zero", "mean", "position_mean"])
def test_each_row_is_its_sets_own_ablation(setup, method):
    """Rows 0..5 ablate sets 0, 1, 2, 3, 1, 0: each row's logits equal the row's with
    ablate_heads of its set over the whole batch (an empty set: the unablated row)."""
    model, ids, mask, fills = setup
    rows = [0, 1, 2, 3, 1, 0]
    with ablate_head_sets(model, SETS, method, fills[method]), head_sets(model, rows):
        got = _logits(model, ids, mask)
    for s, heads in enumerate(SETS):
        with ablate_heads(model, heads, method, fills[method]):
            want = _logits(model, ids, mask)
        for b in (b for b, r in enumerate(rows) if r == s):
            torch.testing.assert_close(got[b], want[b], rtol=0, atol=1e-5)
    assert not ForwardContext.of(model).per_row_sets  # the hook came off


def test_one_set_for_every_row_is_ablate_heads_exactly(setup):
    model, ids, mask, fills = setup
    with ablate_head_sets(model, SETS[:1], "mean", fills["mean"]), \
            head_sets(model, [0] * ids.shape[0]):
        got = _logits(model, ids, mask)
    with ablate_heads(model, SETS[0], "mean", fills["mean"]):
        want = _logits(model, ids, mask)
    assert torch.equal(got, want)


def test_rows_without_their_sets_are_refused(setup):
    model, ids, mask, _ = setup
    with ablate_head_sets(model, SETS, "zero"):
        with pytest.raises(AblationError, match="did not say which set"):
            _logits(model, ids, mask)
        with head_sets(model, [0, 1]), pytest.raises(AblationError, match="6 rows but 2"):
            _logits(model, ids, mask)
        with head_sets(model, [0, 1, 2, 3, 4, 0]), pytest.raises(AblationError,
                                                                  match="4 sets are ablated"):
            _logits(model, ids, mask)


@pytest.mark.parametrize("method", ["resample", "knockout"])
def test_methods_that_fill_by_row_or_edit_attention_are_refused(setup, method):
    """One line naming the key, the value and what is allowed."""
    model = setup[0]
    with pytest.raises(AblationError) as err:
        with ablate_head_sets(model, SETS, method):
            pass
    assert str(err.value) == (f"ablation.method={method} cannot ablate a different head set "
                              "in each batch row (control.draws_per_pass > 1); allowed: "
                              "zero, mean, position_mean")
    assert head_set_methods() == ["zero", "mean", "position_mean"]


def test_heads_outside_the_model_are_refused(setup):
    with pytest.raises(AblationError, match="outside the model"):
        with ablate_head_sets(setup[0], [[(0, 0)], [(9, 0)]], "zero"):
            pass

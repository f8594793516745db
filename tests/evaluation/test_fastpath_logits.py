"""Logits at chosen positions of whole rows through the evaluator's shortcuts
(ih_sweep/evaluation/fastpath/logits.py), the mechanism check's passes: equal to the plain
forward's at those positions, the store of unablated layers used across passes, and the
run-time check on the first batch where the model was not checked yet."""

from __future__ import annotations

import pytest
import torch

from ih_sweep.ablation.hooks import ablate_heads
from ih_sweep.evaluation.fastpath import check, layers, reuse
from ih_sweep.evaluation.fastpath.logits import WHOLE_ROWS, logits_at

HIGH = [(1, h) for h in (18, 6, 4, 31, 24)]  # layer 1 only: layer 0 may come from the store


@pytest.fixture(autouse=True)
def _fresh():
    check.reset()
    reuse.reset()
    yield
    check.reset()
    reuse.reset()


def _rows(n: int = 10, length: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random token rows (pad 0 after each row's own length) and, per row,
    positions inside its own length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 290, (n, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    for i, n_tok in enumerate(lengths.tolist()):
        ids[i, n_tok:] = 0
    positions = torch.stack([torch.tensor([1, int(n_tok) // 2, int(n_tok) - 1])
                             for n_tok in lengths.tolist()])
    return ids, positions


def _plain(model, ids, positions):
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits.float()
    return torch.gather(full, 1, positions[..., None].expand(-1, -1, full.shape[-1]))


@pytest.mark.parametrize("heads", [[], HIGH, [(0, 3), (1, 18)]])
def test_logits_at_equal_the_plain_forward_at_those_positions(tiny, heads):
    """Right-padded rows, with and without ablation hooks (in layer 1 only, and in both
    layers): the same logits as the whole plain forward read at the positions, within
    float32 rounding of a reordered sum, and the same greedy token everywhere."""
    model, _ = tiny
    ids, positions = _rows()
    with ablate_heads(model, heads):
        got = logits_at(model, ids, positions, 4, layer_store_mb=64)
        ref = _plain(model, ids, positions)
    assert got.shape == (10, 3, model.config.vocab_size) and got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-5)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert check.VERDICTS.get(model, (True, WHOLE_ROWS)) is True  # its first batch checked
    assert check.VERDICTS.get(model, True) is None  # the evaluator's still to check


def test_a_later_pass_takes_the_untouched_layer_from_the_store(tiny):
    """The unablated pass stores layer 0 per batch; an ablated pass of the same rows with
    heads in layer 1 only takes it from there (its first reuse checked bit for bit), with
    the logits it computes without a store, bit for bit."""
    model, _ = tiny
    ids, positions = _rows(12, 32, seed=1)
    with ablate_heads(model, HIGH):
        without = logits_at(model, ids, positions, 4, layer_store_mb=0)
    assert model not in reuse._STORES
    unablated = logits_at(model, ids, positions, 4, layer_store_mb=64)
    store = reuse._STORES[model]
    assert store.hits == 0 and len(store) == 3  # 12 rows, 4 a batch: layer 0 of each
    with ablate_heads(model, HIGH):
        reused = logits_at(model, ids, positions, 4, layer_store_mb=64)
    assert store.hits == 3 and not store.off
    assert torch.equal(reused, without)
    assert torch.equal(logits_at(model, ids, positions, 4, layer_store_mb=64), unablated)


def test_a_wrong_shortcut_is_caught_and_the_plain_logits_are_used(tiny, monkeypatch, caplog):
    """A last-layer shortcut that is off (noise): the first batch's check finds it, one
    warning, the verdict kept for the model, and every batch's logits are the plain
    forward's; the noisy layer runs on the first batch only."""
    model, _ = tiny
    calls: list[int] = []
    real = layers.last_layer_at

    def noisy(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        return out + 0.3 * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))

    monkeypatch.setattr(layers, "last_layer_at", noisy)
    caplog.set_level("WARNING", logger="ih_sweep.evaluation.fastpath.logits")
    ids, positions = _rows(9, 30, seed=2)
    got = logits_at(model, ids, positions, 3, fast_layers=True)
    assert calls == [1]
    assert check.VERDICTS.get(model, (True, WHOLE_ROWS)) is False
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "do not reproduce the plain forward" in warnings[0]
    assert torch.allclose(got, _plain(model, ids, positions), atol=1e-5, rtol=1e-6)
    calls.clear()
    logits_at(model, ids, positions, 3, fast_layers=True)  # found wrong: plain from the start
    assert calls == [] and len(caplog.records) == 1


def test_a_model_checked_already_is_not_checked_again(tiny, monkeypatch):
    """Its own verdict, or the evaluator's (whose pass, with masks and a cached prefix,
    exercises all these passes use), spares the check; a False from either turns the
    shortcuts off from the first batch."""
    model, _ = tiny
    compared = []
    real = check.compare_logits
    monkeypatch.setattr("ih_sweep.evaluation.fastpath.logits.compare_logits",
                        lambda *a: compared.append(1) or real(*a))
    ids, positions = _rows(8, 24, seed=3)
    logits_at(model, ids, positions, 4)
    logits_at(model, ids, positions, 4)
    assert compared == [1]
    check.reset()
    check.VERDICTS.set(model, True, True)  # the evaluator's check passed on this model
    logits_at(model, ids, positions, 4)
    assert compared == [1]
    check.reset()
    check.VERDICTS.set(model, True, False)  # ... or failed: the plain forward throughout
    calls = []
    real_layer = layers.last_layer_at
    monkeypatch.setattr(layers, "last_layer_at",
                        lambda *a, **k: calls.append(1) or real_layer(*a, **k))
    plain = logits_at(model, ids, positions, 4)
    assert compared == [1] and calls == []
    assert torch.allclose(plain, _plain(model, ids, positions), atol=1e-5, rtol=1e-6)


def test_reduce_keeps_what_it_returns_of_each_batch(tiny):
    """``reduce``: each batch's logits on the model's device with its rows' slice; only
    what it returns is kept (the mechanism check keeps its target tokens' losses)."""
    model, _ = tiny
    ids, positions = _rows(10, 30, seed=4)
    full = logits_at(model, ids, positions, 4)
    seen = []

    def top(logits, rows):
        seen.append((rows.start, rows.stop, tuple(logits.shape[:2])))
        return logits.argmax(-1)

    picked = logits_at(model, ids, positions, 4, reduce=top)
    assert seen == [(0, 4, (4, 3)), (4, 8, (4, 3)), (8, 10, (2, 3))]
    assert torch.equal(picked, full.argmax(-1))


@pytest.mark.parametrize("positions", [torch.tensor([[0, 40]]), torch.tensor([[-1]]),
                                       torch.zeros((1, 0), dtype=torch.long)])
def test_positions_outside_the_rows_are_refused(tiny, positions):
    model, _ = tiny
    with pytest.raises(ValueError, match="positions"):
        logits_at(model, torch.ones((1, 40), dtype=torch.long), positions, 4)

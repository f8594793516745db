"""Scoring on real model code: a brute-force reference, GQA, the shipped model, the cache."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import torch
import transformers as tf

from ih_sweep.config.schema import ScoringConfig
from ih_sweep.heads.scoring import (
    random_sequences,
    score_heads,
    score_heads_with_samples,
    score_matrix,
)
from ih_sweep.heads.selection import select_heads
from ih_sweep.model.loading import eager_attention
from ih_sweep.testing import copying_by_brute_force


class _Tok:
    """Just what score_heads needs from a tokenizer."""

    bos_token_id = 1
    all_special_ids = [0, 1, 2]
    added_tokens_decoder: dict = {}

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def _gqa_model():
    torch.manual_seed(0)
    cfg = tf.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                           head_dim=8, attn_implementation="eager")
    return tf.MistralForCausalLM(cfg).eval()


def test_gqa_heads_scored_per_query_head():
    model = _gqa_model()
    df = score_heads(model, _Tok(64), ScoringConfig(n_sequences=4, seq_len=10, batch_size=2))
    assert len(df) == 16 and sorted(df["head"].unique()) == list(range(8))
    mat = score_matrix(df, "prefix")
    # query heads sharing a key/value head still get their own scores
    assert len(np.unique(np.round(mat[0, :4], 6))) == 4
    assert ((mat >= 0) & (mat <= 1)).all()


def test_copying_matches_brute_force_full_vocabulary():
    """Direct path through the head's W_O columns, final norm and unembedding, with the
    full-vocabulary mean computed explicitly (testing.copying_by_brute_force)."""
    model = _gqa_model()
    # a final norm with unequal channel weights: with all ones it only rescales each
    # position, which the copying score's ratio cannot see
    torch.nn.init.uniform_(model.model.norm.weight, 0.2, 2.0)
    settings = ScoringConfig(n_sequences=3, seq_len=12, batch_size=3, seed=4)
    got = score_matrix(score_heads(model, _Tok(64), settings), "copying")
    cands = [i for i in range(64) if i not in (0, 1, 2)]
    tok, _ = random_sequences(3, 12, 1, cands, 1, settings.seed + 1)
    ref = copying_by_brute_force(model, tok)
    assert ref.shape == (2, 8) and (ref > 0).any()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def _second_repeat_loss(model, tok, heads):
    from ih_sweep.ablation.hooks import ablate_heads

    with ablate_heads(model, heads), torch.no_grad():
        logits = model(input_ids=tok).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, tok[:, 1:, None])[..., 0]
    return nll[:, 25:].mean().item()  # predictions of repeat 2 ([BOS] + 25 + 25)


def test_shipped_model_has_induction_heads_that_matter(tiny):
    """Positive control: zeroing the heads with prefix >= 0.5 breaks in-context copying far
    more than zeroing the same number of lowest-scoring heads."""
    model, tok = tiny
    with eager_attention(model):
        df = score_heads(model, tok, ScoringConfig())
    mat = score_matrix(df, "prefix")
    strong = [(int(a), int(b)) for a, b in zip(*np.nonzero(mat >= 0.5))]
    assert len(strong) >= 4
    # layer-matched: the globally lowest include layer-0 previous-token heads the circuit needs
    weak = select_heads(mat, "low", len(strong))
    assert set(weak).isdisjoint(strong)
    cands = [i for i in range(len(tok)) if i not in tok.all_special_ids]
    seqs, _ = random_sequences(16, 25, 2, cands, tok.bos_token_id, seed=123)
    base = _second_repeat_loss(model, seqs, [])
    hi = _second_repeat_loss(model, seqs, strong)
    lo = _second_repeat_loss(model, seqs, weak)
    assert base < 1.0
    assert hi - base > 1.0 and hi - base > 5 * (lo - base), (base, hi, lo)


def test_per_sequence_prefix_scores_average_to_the_prefix_score(tiny):
    """Each random sequence's own prefix score: their mean is the prefix column (every
    sequence counts as many queries) and their spread its standard error."""
    model, tok = tiny
    with eager_attention(model):
        df, samples = score_heads_with_samples(model, tok, ScoringConfig(n_sequences=6,
                                                                         batch_size=4))
    assert samples.shape == (6, 2, 32)
    np.testing.assert_allclose(samples.mean(0), score_matrix(df, "prefix"), rtol=0,
                               atol=1e-6)
    np.testing.assert_allclose(samples.std(0, ddof=1).ravel() / np.sqrt(6), df["prefix_se"])
    assert (df["prefix_se"] > 0).any()


def test_scoring_needs_eager(tiny):
    import pytest

    model, tok = tiny
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="eager"):
        score_heads(model, tok, ScoringConfig(n_sequences=2))


def test_score_cache_computed_once_under_concurrency(tmp_path, tiny):
    from compose_config import compose

    from ih_sweep.config.hydra import settings
    from ih_sweep.heads.score_table import get_scores

    cfg = settings(compose(f"paths.cache_dir={tmp_path}", "scoring.n_sequences=4"))
    calls = []

    def getter():
        calls.append(1)
        return tiny

    results: list = []
    threads = [threading.Thread(target=lambda: results.append(get_scores(cfg, getter)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3
    frames = [r[0] for r in results]
    for f in frames[1:]:
        pd.testing.assert_frame_equal(f.reset_index(drop=True), frames[0].reset_index(drop=True),
                                      check_dtype=False)
    path = results[0][1]
    assert path.is_file() and path.with_suffix(".png").is_file()
    assert not list(path.parent.glob(".*.tmp"))

"""``batch_size: auto`` (ih_sweep.model.batching): the memory model's numbers by hand, the choice's
properties (monotone in free memory, at least 1, capped, a power of two), the config keys,
and the resolvers on CPU and, with the device query replaced, on the CUDA path."""

from __future__ import annotations

import pytest
import torch
from compose_config import compose
from transformers import GPT2Config, MistralConfig, OPTConfig

from ih_sweep import data
from ih_sweep.config.errors import ConfigError
from ih_sweep.config.hydra import settings
from ih_sweep.config.identity import config_hash
from ih_sweep.config.schema import ScoringConfig
from ih_sweep.evaluation.evaluator import build_rows
from ih_sweep.model import batching as B

GIB = 2**30
# Mistral-7B-v0.1's shape (its config.json)
MISTRAL_7B = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                           num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8)
SHAPE_7B = B.model_shape(MISTRAL_7B)


def test_mistral_7b_bf16_with_40_gib_free_by_hand():
    """Rows of 200 tokens, 3 read positions, bf16 (2 bytes):
    KV cache 2 x 32 layers x 8 KV heads x 128 x 2 B = 131,072 B a token;
    activations: attention block 3 x 4096 + 5 x 4096 + 3 x 1024 = 35,840, MLP block
    2 x 4096 + 3 x 14336 = 51,200 (the larger) x 2 B = 102,400 B a token;
    a row: 200 x 233,472 + logits 3 x 32,000 x (2 + 4) = 46,694,400 + 576,000 = 47,270,400 B;
    usable: 0.8 x 40 GiB - 1 GiB = 33,285,996,544 B -> 704 rows fit (704 x 47,270,400 =
    33,278,361,600); the largest power of two <= 704 is 512, capped at 256."""
    assert SHAPE_7B == B.ModelShape(layers=32, hidden=4096, heads=32, kv_heads=8,
                                    head_dim=128, intermediate=14336, vocab=32000)
    assert B.kv_bytes_per_token(SHAPE_7B, 2) == 131_072
    assert B.activation_bytes_per_token(SHAPE_7B, 2) == 102_400
    assert B.row_bytes(SHAPE_7B, 2, 200, 3) == 47_270_400
    assert B.usable_bytes(40 * GIB) == 33_285_996_544
    assert B.rows_that_fit(40 * GIB, SHAPE_7B, 2, 200, 3) == 704
    assert B.rows_per_batch(40 * GIB, SHAPE_7B, 2, 200, 3, cap=1024) == 512
    assert B.rows_per_batch(40 * GIB, SHAPE_7B, 2, 200, 3) == B.MAX_ROWS == 256
    # the token budget: 33,285,996,544 // 233,472 a token
    assert B.tokens_per_batch(40 * GIB, SHAPE_7B, 2) == 142_569


def test_mistral_7b_on_a_24_gib_card_is_below_the_cap():
    """bf16 weights (13.5 GiB) and the CUDA context (0.6 GiB) leave 9.9 GiB:
    usable 0.8 x 9.9 GiB - 1 GiB = 7,430,293,422 B -> 157 rows of 200 tokens -> 128."""
    free = (24 - 13.5 - 0.6) * GIB
    assert B.rows_that_fit(free, SHAPE_7B, 2, 200, 3) == 157
    assert B.rows_per_batch(free, SHAPE_7B, 2, 200, 3) == 128


def test_rows_are_monotone_in_free_memory_at_least_one_capped_and_powers_of_two():
    seen = [B.rows_per_batch(g * GIB / 4, SHAPE_7B, 2, 200, 3) for g in range(0, 800)]
    assert seen == sorted(seen)
    assert seen[0] == 1 and min(seen) == 1  # nothing free: still one row
    assert max(seen) == B.MAX_ROWS
    assert all(n & (n - 1) == 0 for n in seen)
    assert B.rows_per_batch(-5 * GIB, SHAPE_7B, 2, 200, 3) == 1


def test_longer_rows_more_reads_and_eager_attention_never_give_more_rows():
    free = 12 * GIB
    by_length = [B.rows_that_fit(free, SHAPE_7B, 2, t, 3) for t in (50, 100, 200, 400, 800)]
    assert by_length == sorted(by_length, reverse=True) and by_length[-1] < by_length[0]
    assert B.rows_that_fit(free, SHAPE_7B, 2, 200, 30) < B.rows_that_fit(free, SHAPE_7B, 2,
                                                                         200, 3)
    eager = B.rows_that_fit(free, SHAPE_7B, 2, 400, 3, eager=True)
    assert eager < B.rows_that_fit(free, SHAPE_7B, 2, 400, 3)
    # eager's scores: 32 heads x 400^2 x (2 + 2 + 4) B = 40,960,000 B more a row
    assert B.row_bytes(SHAPE_7B, 2, 400, 3, eager=True) - B.row_bytes(SHAPE_7B, 2, 400, 3) \
        == 40_960_000
    # float32 doubles every per-token term
    assert B.activation_bytes_per_token(SHAPE_7B, 4) == 2 * 102_400


def test_model_shape_reads_each_familys_key_names(tiny):
    gpt2 = B.model_shape(GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=97))
    assert gpt2 == B.ModelShape(layers=3, hidden=64, heads=4, kv_heads=4, head_dim=16,
                                intermediate=256, vocab=97)  # n_inner=None: 4 x hidden
    opt = B.model_shape(OPTConfig(hidden_size=32, ffn_dim=80, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=50))
    assert (opt.intermediate, opt.kv_heads, opt.head_dim) == (80, 4, 8)
    model, _ = tiny
    assert B.model_shape(model.config) == B.ModelShape(layers=2, hidden=64, heads=32,
                                                       kv_heads=8, head_dim=16,
                                                       intermediate=256, vocab=296)
    assert B.compute_dtype_bytes(model) == 4


def test_scoring_sequences_by_hand():
    """A repeated sequence of 1 + 25 x 4 = 101 tokens and a plain one of 26, Mistral-7B,
    bf16: 110,570,496 B a sequence (module docstring's terms; the copying pass's 6 float32
    [25, 32, 4096] buffers are 78,643,200 B of it). 2 GiB free: usable 644,245,094 B -> 5
    -> 4; 40 GiB free: every one of the 16 sequences in one batch."""
    assert B.scoring_row_bytes(SHAPE_7B, 2, 25, 4) == 110_570_496
    assert B.scoring_rows(2 * GIB, SHAPE_7B, 2, 25, 4, 16) == 4
    assert B.scoring_rows(40 * GIB, SHAPE_7B, 2, 25, 4, 16) == 16
    assert B.scoring_rows(0, SHAPE_7B, 2, 25, 4, 16) == 1


def test_scan_heads_per_pass_by_hand():
    """The scan's bAbI probe (200 rows x 200 tokens, 1 scored position) and repeat probe
    (16 x 51, 25): held before any replica 200 x 200 x (32 x 4096 + 32000) x 2 B =
    13,045,760,000 B plus 266,133,504 B; a bAbI replica 200 x (200 x 102,400 + 200^2 +
    32,000 x 10) = 4,168,000,000 B. 40 GiB free: (33,285,996,544 - 13,311,893,504) //
    4,168,000,000 = 4 heads a pass; 120 GiB: 21 -> 16; 10 GiB: none fit -> 1."""
    probes = [(200, 200, 1), (16, 51, 25)]
    assert B.scan_fixed_bytes(SHAPE_7B, 2, 200, 200) == 13_045_760_000
    assert B.scan_replica_bytes(SHAPE_7B, 2, 200, 200, 1) == 4_168_000_000
    assert B.scan_heads(40 * GIB, SHAPE_7B, 2, probes) == 4
    assert B.scan_heads(120 * GIB, SHAPE_7B, 2, probes) == 16
    assert B.scan_heads(10 * GIB, SHAPE_7B, 2, probes) == 1
    assert B.scan_heads(10_000 * GIB, SHAPE_7B, 2, probes) == 32  # at most a layer's heads


def _rows(tok, scope: str, n: int = 12):
    return build_rows(tok, data.make_items(data.generate_stories(n, seed=3), scope), 3)


def test_auto_on_cpu_is_the_old_numbers_and_a_number_is_kept(tiny):
    model, tok = tiny
    rows = _rows(tok, "last")
    assert B.eval_batch_rows("auto", model, rows, 3) == B.CPU_EVAL_ROWS == 32
    assert B.eval_batch_rows(7, model, rows, 3) == 7
    assert B.scoring_batch_rows(ScoringConfig(), model) == B.CPU_SCORING_ROWS == 8
    assert B.scoring_batch_rows(ScoringConfig(batch_size=3), model) == 3
    assert B.scan_heads_per_pass("auto", model, {}) == B.CPU_HEADS_PER_PASS == 1
    assert B.scan_heads_per_pass(5, model, {}) == 5


@pytest.mark.parametrize("scope,reads", [("last", 3), ("all", 15)])
def test_auto_on_the_cuda_path_reads_the_rows_and_the_model(tiny, monkeypatch, scope, reads):
    """The CUDA branch with the device query replaced (this machine has no GPU): the
    longest row and its read positions, the model's shape and float32."""
    model, tok = tiny
    rows = _rows(tok, scope)
    longest = max(len(r) for r, _ in rows)
    monkeypatch.setattr(B, "_cuda_device", lambda m: torch.device("cuda", 0))
    monkeypatch.setattr(B, "free_device_bytes", lambda d: int(1.5 * GIB))
    shape = B.model_shape(model.config)
    want = B.rows_per_batch(1.5 * GIB, shape, 4, longest, reads)
    assert 1 < want < B.MAX_ROWS  # below the cap: the inputs matter
    assert B.rows_per_batch(1.5 * GIB, shape, 4, 2 * longest, reads) < want
    assert B.eval_batch_rows("auto", model, rows, 3) == want
    assert B.eval_batch_rows(9, model, rows, 3) == 9
    settings_ = ScoringConfig(n_sequences=64)
    assert B.scoring_batch_rows(settings_, model) == B.scoring_rows(1.5 * GIB, shape, 4, 25,
                                                                    4, 64) > 1


def test_config_accepts_auto_and_numbers_and_they_do_not_change_the_hash():
    default = settings(compose())
    assert (default.eval.batch_size, default.scoring.batch_size,
            default.scan.heads_per_pass) == ("auto", "auto", "auto")
    numbers = settings(compose("eval.batch_size=64", "scoring.batch_size=4",
                               "scan.heads_per_pass=8"))
    assert (numbers.eval.batch_size, numbers.scoring.batch_size,
            numbers.scan.heads_per_pass) == (64, 4, 8)
    assert config_hash(default) == config_hash(numbers)
    with pytest.raises(ConfigError, match=r"^eval.batch_size='lots' is not allowed; "
                                          r"allowed: auto, or an integer >= 1$"):
        settings(compose("eval.batch_size=lots"))


def test_mistral_7b_nf4_on_a_16_gb_t4():
    """examples/mistral_7b_nf4_colab.ipynb's number: a T4 shows 15.0 GiB (15,360 MiB); the
    CUDA context takes ~0.4 GiB and Mistral-7B in nf4 ~3.9 GiB (4-bit linear layers with
    double-quantized constants, embeddings and lm_head in 16 bits), leaving 10.7 GiB; its
    layers compute in 16 bits (2 B). usable 0.8 x 10.7 GiB - 1 GiB = 8,117,488,189 B ->
    171 rows of 47,270,400 B (200 tokens) -> 128."""
    free = (15.0 - 0.4 - 3.9) * GIB
    assert B.rows_that_fit(free, SHAPE_7B, 2, 200, 3) == 171
    assert B.rows_per_batch(free, SHAPE_7B, 2, 200, 3) == 128

"""The induction-edge knockout (ih_sweep.model.edges) against a hand-written masked
attention, on the shipped tiny model (Mistral) and GPT-2 (tests/families.py), eager and sdpa,
padded batches, decoding with a cache and generate."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import transformers as tf
from families import CONFIGS

from ih_sweep.model.attention import attention_implementation
from ih_sweep.model.edges import EdgesUnknown, induction_edges, knock_out
from ih_sweep.model.sites import attention_module, head_sites

HEADS = [(0, 1), (1, 3), (1, 0)]
# BOS, then a random sequence and its repeat: many induction edges
_G = torch.Generator().manual_seed(0)
_SEQ = torch.randint(3, 290, (2, 12), generator=_G)
REPEATED = torch.cat([torch.ones(2, 1, dtype=torch.long), _SEQ, _SEQ], 1)  # [2, 25]


def edges_by_hand(tokens: list[int]) -> set[tuple[int, int]]:
    """(query i, key j) with 1 <= j <= i and tokens[j - 1] == tokens[i], by two loops."""
    return {(i, j) for i in range(len(tokens)) for j in range(1, i + 1)
            if tokens[j - 1] == tokens[i]}


def reference(model, mode: str, heads, tokens: torch.Tensor):
    """A second mechanism: an attention function written out here (scores, mask, softmax,
    weighted values) that knocks out edges_by_hand of each (unpadded) row in ``heads``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    sites = head_sites(model)
    layer_of = {attention_module(la): i for i, la in enumerate(sites.layers)}
    rows = [edges_by_hand(r) for r in tokens.tolist()]

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        b, h, t, d = query.shape
        groups = h // key.shape[1]
        k = key.repeat_interleave(groups, 1)
        v = value.repeat_interleave(groups, 1)
        scale = scaling if scaling is not None else d ** -0.5
        if isinstance(module, tf.models.gpt2.modeling_gpt2.GPT2Attention):
            scale = d ** -0.5
        scores = (query @ k.transpose(-1, -2)).float() * scale
        if kw.get("softcap"):  # Gemma-2's attention logit softcapping
            scores = torch.tanh(scores / kw["softcap"]) * kw["softcap"]
        s = scores.shape[-1]
        layer = layer_of[module]
        knock = torch.zeros(b, h, t, s, dtype=torch.bool)
        for row in range(b):
            for i, j in rows[row]:
                for head in [hd for la, hd in heads if la == layer]:
                    knock[row, head, i - (s - t), j] = i >= s - t
        causal = torch.ones(t, s, dtype=torch.bool).tril(s - t)
        if kw.get("sliding_window"):  # Gemma-2/3's local layers: the last window keys only
            causal &= ~torch.ones(t, s, dtype=torch.bool).tril(s - t - kw["sliding_window"])
        if mode == "mask":
            scores = scores.masked_fill(knock, -math.inf)
        weights = scores.masked_fill(~causal, -math.inf).softmax(-1)
        if mode == "zero":
            weights = weights.masked_fill(knock, 0)
        return (weights.to(v.dtype) @ v).transpose(1, 2).contiguous(), weights

    name = f"test_knockout_ref_{mode}"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, eager_mask)
    return attention_implementation(model, name)


def family_model(name: str):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[name]).eval()
    return model


@pytest.fixture(scope="module")
def gpt2():
    return family_model("gpt2")


def _models(tiny, gpt2):
    return {"tiny": tiny[0], "gpt2": gpt2}


def test_edges_match_the_definition():
    tokens = torch.tensor([[1, 5, 6, 5, 6, 6, 7, 5]])
    got = induction_edges(tokens, torch.ones_like(tokens, dtype=torch.bool), 8)
    assert {tuple(x) for x in got[0].nonzero().tolist()} == edges_by_hand(tokens[0].tolist())
    assert (3, 2) in edges_by_hand(tokens[0].tolist())  # 5 at 3: after the 5 at 1 comes 2


def test_edges_skip_padding_and_masked_columns():
    """Positions count real tokens only: a pad between two halves changes nothing."""
    plain = torch.tensor([[1, 5, 6, 5, 6]])
    padded = torch.tensor([[1, 5, 0, 6, 5, 6]])
    valid = torch.tensor([[1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    a = induction_edges(plain, torch.ones_like(plain, dtype=torch.bool), 5)[0]
    b = induction_edges(padded, valid, 6)[0]
    keep = [0, 1, 3, 4, 5]
    assert torch.equal(b[keep][:, keep], a)
    assert not b[2].any() and not b[:, 2].any()


@pytest.mark.parametrize("mode", ["mask", "zero"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("which", ["tiny", "gpt2"])
@torch.no_grad()
def test_knockout_equals_hand_written_masked_attention(tiny, gpt2, which, impl, mode):
    model = _models(tiny, gpt2)[which]
    with attention_implementation(model, impl):
        plain = model(input_ids=REPEATED).logits
        with knock_out(model, HEADS, mode):
            got = model(input_ids=REPEATED).logits
        assert model.config._attn_implementation == impl  # put back
    with reference(model, mode, HEADS, REPEATED):
        want = model(input_ids=REPEATED).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-3  # the knockout changes something here


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_every_family_equals_hand_written_masked_attention(name):
    """Random-weight models of every supported family (eager; the sdpa and zero cases:
    the test above), 25 tokens: longer than Gemma-2/3's 16-token sliding window."""
    model = family_model(name)
    with attention_implementation(model, "eager"):
        with knock_out(model, HEADS):
            got = model(input_ids=REPEATED).logits
        with reference(model, "mask", HEADS, REPEATED):
            want = model(input_ids=REPEATED).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_layers_without_chosen_heads_keep_their_implementation(tiny):
    """Heads of layer 1 only, on sdpa: layer 0's output is the plain model's, bit for bit,
    and the whole pass is the hand-written one's."""
    from ih_sweep.model.sites import hook_z

    model = tiny[0]
    heads = [(1, 3), (1, 7)]
    seen: dict[str, torch.Tensor] = {}
    with attention_implementation(model, "sdpa"):
        with hook_z(model, lambda la, z: seen.setdefault("plain", z.clone()), [0]):
            model(input_ids=REPEATED)
        with knock_out(model, heads), \
                hook_z(model, lambda la, z: seen.setdefault("knocked", z.clone()), [0]):
            got = model(input_ids=REPEATED).logits
    assert torch.equal(seen["plain"], seen["knocked"])
    with reference(model, "mask", heads, REPEATED):
        want = model(input_ids=REPEATED).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_no_repeated_token_no_change(tiny):
    model = tiny[0]
    ids = torch.tensor([[1, *range(10, 30)]])
    plain = model(input_ids=ids).logits
    with knock_out(model, HEADS):
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("which", ["tiny", "gpt2"])
@torch.no_grad()
def test_padded_batch_equals_rows_alone(tiny, gpt2, which, side):
    model = _models(tiny, gpt2)[which]
    short = REPEATED[1, :17]
    ids = torch.zeros(2, 25, dtype=torch.long)
    mask = torch.zeros(2, 25, dtype=torch.long)
    ids[0], mask[0] = REPEATED[0], 1
    cols = slice(0, 17) if side == "right" else slice(8, 25)
    ids[1, cols], mask[1, cols] = short, 1
    from ih_sweep.model.positions import positions_from_mask

    with knock_out(model, HEADS):
        both = model(input_ids=ids, attention_mask=mask,
                     position_ids=positions_from_mask(mask)).logits
        alone = [model(input_ids=REPEATED[:1]).logits[0], model(input_ids=short[None]).logits[0]]
    torch.testing.assert_close(both[0], alone[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both[1, cols], alone[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which", ["tiny", "gpt2"])
@torch.no_grad()
def test_decoding_with_a_cache_sees_the_whole_sequence(tiny, gpt2, which):
    """generate (a cache, one token a step) gives what full passes without a cache give:
    the edges of each new query reach back into the prompt."""
    model = _models(tiny, gpt2)[which]
    prompt = REPEATED[:1, :20]  # the repeat half-way: the next tokens are induction guesses
    with knock_out(model, HEADS):
        out = model.generate(prompt, max_new_tokens=5, do_sample=False, num_beams=1,
                             pad_token_id=0, temperature=None, top_p=None, top_k=None,
                             output_scores=True, return_dict_in_generate=True)
        seq = prompt
        for step in range(5):
            logits = model(input_ids=seq, use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.scores[step], logits, atol=1e-4, rtol=1e-4)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.sequences, seq)


@torch.no_grad()
def test_a_cache_filled_unseen_is_refused(tiny):
    model = tiny[0]
    cache = tf.DynamicCache(config=model.config)
    # the cache argument's name: "cache" in newer transformers, "past_key_values" in 5.0
    name = "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"
    model(input_ids=REPEATED[:1, :10], use_cache=True, **{name: cache})
    assert cache.get_seq_length() == 10
    with knock_out(model, HEADS), pytest.raises(EdgesUnknown, match="was not seen"):
        model(input_ids=REPEATED[:1, 10:11], use_cache=True, **{name: cache})


def test_other_implementations_are_refused_in_one_line(tiny):
    model = tiny[0]
    text = model.config.get_text_config(decoder=True)
    before = text._attn_implementation
    text._attn_implementation = "flex_attention"
    try:
        with pytest.raises(EdgesUnknown) as err, knock_out(model, HEADS):
            pass
    finally:
        text._attn_implementation = before
    assert "\n" not in str(err.value) and "allowed values: eager, sdpa" in str(err.value)

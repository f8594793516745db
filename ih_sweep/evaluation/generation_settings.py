"""Which settings of a model's own generation config change what greedy ``generate`` returns.

The notebook's method is ``model.generate`` on one prompt at a time, and ``generate`` applies
the model's ``generation_config.json``. The evaluator's fast path reads the plain argmax of
the logits instead, so a setting that makes ``generate``'s greedy choice differ from that
argmax (a repetition penalty, say) would make the two disagree. Such models are evaluated by
``generate`` itself (:func:`.evaluation.evaluate` routes them; exact by construction).

Source of the lists: transformers 5.24, ``GenerationMixin._get_logits_processor`` (the
processors applied whatever the decoding mode, before the sampling-only warpers),
``_get_stopping_criteria``, ``token_healing`` in ``generate``, and
``GenerationConfig.get_generation_mode``; the same fields
exist from transformers 5.0. For a decoder-only model ``generate`` passes the prompt as
``encoder_input_ids``, so the ``encoder_*`` settings act on it too.

Fields that do not change the greedy tokens of a prompt of two tokens or more, and are left
alone: ``forced_bos_token_id`` (acts only when the input is one token long),
``renormalize_logits`` (a log-softmax: the argmax stays), ``remove_invalid_values`` (changes
only NaN/inf logits), the sampling warpers (``temperature``, ``top_k``, ``top_p``,
``min_p``, ``typical_p``, ``epsilon_cutoff``, ``eta_cutoff``, ``top_h``: applied only when
sampling), ``max_length``/``max_new_tokens`` (the evaluator passes its own budget) and
``max_time`` (a wall-clock stop, not reproducible by any method).

Pure: everything here reads a ``GenerationConfig`` (or any object with its attributes).
"""

from __future__ import annotations

import copy
from collections.abc import Callable


def _not_one(v) -> bool:
    return v is not None and float(v) != 1.0


def _positive(v) -> bool:
    return v is not None and v > 0


def _given(v) -> bool:
    return v is not None and not (hasattr(v, "__len__") and len(v) == 0)


# (field, whether its value changes greedy output): GenerationMixin._get_logits_processor and
# _get_stopping_criteria, transformers 5.24; the conditions are the library's own (e.g.
# `repetition_penalty != 1.0`, `no_repeat_ngram_size > 0`). min_length/min_new_tokens and
# forced_eos need an end-of-sequence token to act on: counted as set regardless (routing a
# model that did not need it costs time, not exactness).
GREEDY_CHANGING: tuple[tuple[str, Callable[[object], bool]], ...] = (
    ("repetition_penalty", _not_one),  # RepetitionPenaltyLogitsProcessor
    ("encoder_repetition_penalty", _not_one),  # EncoderRepetitionPenaltyLogitsProcessor
    ("no_repeat_ngram_size", _positive),  # NoRepeatNGramLogitsProcessor
    ("encoder_no_repeat_ngram_size", _positive),  # EncoderNoRepeatNGramLogitsProcessor
    ("bad_words_ids", _given),  # NoBadWordsLogitsProcessor
    ("sequence_bias", _given),  # SequenceBiasLogitsProcessor
    ("suppress_tokens", _given),  # SuppressTokensLogitsProcessor
    ("begin_suppress_tokens", _given),  # SuppressTokensAtBeginLogitsProcessor (1st new token)
    ("min_length", _positive),  # MinLengthLogitsProcessor (prompt included; EOS held back)
    ("min_new_tokens", _positive),  # MinNewTokensLengthLogitsProcessor
    ("forced_eos_token_id", _given),  # ForcedEOSTokenLogitsProcessor (the last budget token)
    ("exponential_decay_length_penalty", _given),  # ExponentialDecayLengthPenalty
    ("guidance_scale", _not_one),  # UnbatchedClassifierFreeGuidanceLogitsProcessor
    ("watermarking_config", _given),  # the watermark processor biases "green" tokens
    ("stop_strings", _given),  # StopStringCriteria: generation ends after one
    ("token_healing", lambda v: v is True),  # generate rewrites the prompt's last tokens
)

# decoding modes other than greedy search (GenerationConfig.get_generation_mode): the
# evaluator decodes greedily by design and overrides these, whatever the config says
NOT_GREEDY: tuple[tuple[str, Callable[[object], bool]], ...] = (
    ("do_sample", lambda v: v is True),
    ("num_beams", lambda v: v is not None and v > 1),
    ("num_beam_groups", lambda v: v is not None and v > 1),
    ("penalty_alpha", _positive),  # contrastive search (with top_k > 1)
    ("dola_layers", _given),
    ("constraints", _given),
    ("force_words_ids", _given),
    ("prompt_lookup_num_tokens", _given),
    ("assistant_early_exit", _given),
    ("use_mtp", lambda v: v is True),
)
# the other fields _get_logits_processor / _get_stopping_criteria read (transformers 5.24),
# and why they do not change the greedy tokens the evaluator compares
LEFT_ALONE = {
    "forced_bos_token_id": "acts only on a one-token input",
    "renormalize_logits": "a log-softmax keeps the argmax",
    "remove_invalid_values": "changes only NaN/inf logits",
    **{name: "a sampling warper (do_sample only)" for name in (
        "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff",
        "eta_cutoff", "top_h")},
    "max_length": "the evaluator passes its own budget (max_new_tokens)",
    "max_time": "a wall-clock stop, not reproducible",
    "num_return_sequences": "one sequence per prompt (greedy search returns one)",
    "use_cache": "speed only",
    "_eos_token_tensor": "the end-of-sequence tokens: eos_token_id",
    "is_assistant": "set on assistant models of assisted decoding only",
    "assistant_confidence_threshold": "assistant models only",
}
# what a generate call sets to decode greedily (None where the field means "off")
GREEDY_OVERRIDES = {"do_sample": False, "num_beams": 1, "num_beam_groups": 1,
                    "penalty_alpha": None, "dola_layers": None, "constraints": None,
                    "force_words_ids": None, "prompt_lookup_num_tokens": None,
                    "assistant_early_exit": None, "use_mtp": False, "temperature": None,
                    "top_k": None, "top_p": None, "num_return_sequences": 1}


def _eos_ids(value) -> frozenset[int]:
    if value is None:
        return frozenset()
    if isinstance(value, int):
        return frozenset({value})
    return frozenset(int(v) for v in value)


def greedy_changing(config, eos_token_id: int | None) -> dict[str, object]:
    """The fields of ``config`` (a ``GenerationConfig``; None: none) set so that greedy
    ``generate`` returns other tokens than the argmax of the logits, stopped at
    ``eos_token_id`` (the token the evaluator stops at: the tokenizer's), by field name
    with their values. ``eos_token_id`` is one of them where the config's end-of-sequence
    tokens are not exactly that one (``generate`` stops at the config's)."""
    if config is None:
        return {}
    found = {name: getattr(config, name, None) for name, changes in GREEDY_CHANGING
             if changes(getattr(config, name, None))}
    config_eos = getattr(config, "eos_token_id", None)
    if _eos_ids(config_eos) != _eos_ids(eos_token_id):
        found["eos_token_id"] = config_eos
    return found


def not_greedy(config) -> dict[str, object]:
    """The decoding-mode fields of ``config`` that ask for something other than greedy
    search (sampling, beams, contrastive search, DoLa, constraints, assisted decoding), by
    name with their values; with ``do_sample``, the sampling settings that go with it."""
    if config is None:
        return {}
    found = {name: getattr(config, name, None) for name, asks in NOT_GREEDY
             if asks(getattr(config, name, None))}
    if found.get("do_sample"):
        for name in ("temperature", "top_k", "top_p"):
            if getattr(config, name, None) is not None:
                found[name] = getattr(config, name)
    return found


def describe(settings: dict[str, object]) -> str:
    """``name=value`` pairs, comma-separated, for a log line."""
    return ", ".join(f"{name}={value!r}" for name, value in settings.items())


def greedy_config(config, max_new_tokens: int, pad_token_id: int):
    """A copy of ``config`` (a ``GenerationConfig``) for greedy decoding of
    ``max_new_tokens`` tokens: its greedy-changing settings kept, its decoding mode set to
    greedy search (:data:`GREEDY_OVERRIDES`), and the scores returned (``output_scores``:
    the logits after the processors, the ones the greedy choice is made from)."""
    out = copy.deepcopy(config)
    for name, value in GREEDY_OVERRIDES.items():
        if hasattr(out, name):
            setattr(out, name, value)
    out.max_new_tokens = max_new_tokens
    out.max_length = None
    out.pad_token_id = pad_token_id
    out.output_scores = True
    out.return_dict_in_generate = True
    return out

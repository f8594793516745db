"""Fast, seed-faithful bAbI evaluation.

The seed generated 3 greedy tokens for one story at a time. Here each item is first decided
by one batched teacher-forced forward pass: feeding the prompt plus a candidate continuation
(the gold answer and what follows it) reveals the greedy tokens for as long as they agree
with the candidate. When those known tokens already settle the metric the item is done;
otherwise greedy decoding goes on from the pass's own key/value cache (masked to the valid
prefix), or, for models whose cache cannot be reused exactly, by ``generate``. Either way the
outcome is what one-story-at-a-time ``generate`` gives. With scope ``all``, every question
of a story whose prompt tokenizes as a prefix of the story's full text is read off one shared
forward pass.

Per item the same pass also yields continuous measures (no extra pass): ``gold_logprob``
(the log-probability of every gold answer token given the prompt), ``logit_diff`` (the gold
answer's first-token logit minus the best other candidate answer's) and, from the greedy
steps that decided the item, ``margin`` (the smallest top-1 minus top-2 logit gap) and
``near_tie`` (that gap within the rounding of the model's compute dtype, so that another batch
size or kernel could flip the outcome: :data:`NEAR_TIE_TOLERANCE`). What a batch needs from
the device comes back in one copy per forward pass or decoding step.

The evaluator's speed shortcuts (:mod:`.fastpath`) are checked at run time: the first
batch's teacher-forced logits at the read positions are compared with the plain forward's
(:func:`.fastpath.check.check_first_batch`); where they differ beyond the dtype's tolerance
the evaluation goes on without the shortcuts.

Where each part lives: :mod:`.rows` (the token rows), :mod:`.decoding` (greedy from the pass,
from its cache, by ``generate``), :mod:`.runner` (:func:`evaluate`: batches, threads,
out-of-memory halving), :mod:`.batches`, :mod:`.near_ties`, :mod:`.by_generate` (the model's
own generation config), :mod:`.metrics`, :mod:`.fastpath`. This module gathers the public
names under one roof (and keeps earlier imports working).
"""

from __future__ import annotations

from ih_sweep.config.schema import EvalConfig, Metric, Scope
from ih_sweep.evaluation.batches import batch_threads, intra_op_threads
from ih_sweep.evaluation.decoding import ItemResult, continue_greedy, generate_greedy
from ih_sweep.evaluation.fastpath.check import CHECK_TOLERANCE, check_tolerance, compare_logits
from ih_sweep.evaluation.fastpath.install import installed
from ih_sweep.evaluation.metrics import decide_partial, is_correct, words
from ih_sweep.evaluation.near_ties import (
    NEAR_TIE_TOLERANCE,
    compute_dtype,
    near_tie,
    near_tie_tolerance,
)
from ih_sweep.evaluation.rows import (
    MIN_SHARED_PREFIX,
    answer_tokens,
    build_rows,
    shared_prefix_length,
)
from ih_sweep.evaluation.runner import PromptTooLong, check_prompt_lengths, evaluate

__all__ = ["CHECK_TOLERANCE", "MIN_SHARED_PREFIX", "NEAR_TIE_TOLERANCE", "EvalConfig",
           "ItemResult", "Metric", "PromptTooLong", "Scope", "answer_tokens", "batch_threads",
           "build_rows", "check_prompt_lengths", "check_tolerance", "compare_logits",
           "compute_dtype", "continue_greedy", "decide_partial", "evaluate", "generate_greedy",
           "installed", "intra_op_threads", "is_correct", "near_tie", "near_tie_tolerance",
           "shared_prefix_length", "words"]

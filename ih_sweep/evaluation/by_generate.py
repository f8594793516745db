"""Items evaluated by ``model.generate`` with the model's own generation config, where that
config changes what greedy decoding returns (which settings count:
:mod:`.generation_settings`)."""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Sequence
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from ih_sweep.config.schema import EvalConfig
from ih_sweep.evaluation import generation_settings as gs
from ih_sweep.evaluation.decoding import (
    ItemResult,
    cut_at_eos,
    deciding_length,
    decode,
    model_device,
    step_stats,
)
from ih_sweep.evaluation.metrics import cut_at_stop, is_correct, stop_seen
from ih_sweep.evaluation.near_ties import near_tie, near_tie_tolerance
from ih_sweep.evaluation.rows import encode
from ih_sweep.model.forward import ForwardContext
from ih_sweep.model.rotary import reset_rotary
from ih_sweep.model.tokens import pad_id

log = logging.getLogger(__name__)


# the generation-config lines logged in this process, by model (each line once per model)
_TOLD_GENERATION: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOLD_LOCK = threading.Lock()


def reset() -> None:
    """Forget which generation-config lines were logged (each is logged again once)."""
    with _TOLD_LOCK:
        _TOLD_GENERATION.clear()


@torch.no_grad()
def by_model_generate(model, tokenizer, results: list[ItemResult], settings: EvalConfig,
                      reason: str | None = None, head_sets: Sequence[int] | None = None
                      ) -> list[ItemResult]:
    """``results`` (the fast path's) where the model's generation config changes nothing
    that greedy decoding returns; else each item's outcome by ``model.generate`` on its
    prompt alone with that config (the notebook's method, exact by construction; slower):
    continuation, correctness, ``decided_by="generate"``, and ``margin``/``near_tie`` from
    generate's scores (the logits after its processors, those the greedy choice is made
    from), up to the deciding step. ``gold_logprob`` and ``logit_diff`` stay the forward
    pass's (they are read off the model's own distribution, before any processor).

    Which settings count: :mod:`.generation_settings`. Decoding modes other than greedy
    search in the config (sampling, beams, ...) are overridden: the tool evaluates
    greedily by design. One log line per model says which settings were found.
    ``reason``: why every item goes to ``generate`` whatever the config (a batch-dependent
    rotary scaling, :func:`ih_sweep.model.rotary.batch_dependent`; its rotary state is
    reset before each item, as a freshly loaded model has it). ``head_sets``: each result's
    head set (:meth:`ih_sweep.model.forward.ForwardContext.head_sets`; None: set 0 each)."""
    config = getattr(model, "generation_config", None)
    eos = tokenizer.eos_token_id
    changing, ignored = gs.greedy_changing(config, eos), gs.not_greedy(config)
    with _TOLD_LOCK:
        told = _TOLD_GENERATION.setdefault(model, set())
    lines = []
    if ignored:
        lines.append(f"the model's generation config asks for {gs.describe(ignored)}: the "
                     "tool evaluates greedily by design (do_sample=False, num_beams=1)")
    if changing and results:
        lines.append(f"the model's generation config sets {gs.describe(changing)}, which "
                     "changes greedy output: items are evaluated by model.generate with it, "
                     "one at a time (exact, slower than the fast path)")
    for line in lines:
        if line not in told:
            log.warning("%s", line)
            told.add(line)
    if not (changing or reason) or not results:
        return results
    device = model_device(model)
    tolerance = near_tie_tolerance(model)
    greedy = gs.greedy_config(config, settings.max_new_tokens, pad_id(tokenizer))
    out = []
    ctx = ForwardContext.of(model)
    for j, r in enumerate(tqdm(results, desc="generate", unit="item",
                               disable=not settings.progress, leave=False)):
        ids = torch.tensor([encode(tokenizer, r.item.prompt)], device=device)
        if reason:
            reset_rotary(model)
        with ctx.head_sets([head_sets[j] if head_sets is not None else 0]):
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 generation_config=greedy, tokenizer=tokenizer,
                                 stopping_criteria=stop_criteria(tokenizer, ids.shape[1],
                                                                 settings.stop))
        steps = step_stats(torch.stack(gen.scores, 1))[0].cpu().tolist()
        toks = cut_at_eos(gen.sequences[0, ids.shape[1]:].tolist(), eos)
        text, answer = decode(tokenizer, toks), r.item.target
        decided = deciding_length(tokenizer, toks, answer, settings, eos)
        gaps, tops = [s[1] for s in steps[:decided]], [s[2] for s in steps[:decided]]
        out.append(replace(r, continuation=cut_at_stop(text, settings.stop),
                           decided_by="generate",
                           correct=is_correct(text, answer, settings.metric, settings.stop),
                           margin=min(gaps, default=math.nan),
                           near_tie=near_tie(gaps, tops, tolerance)))
    return out


def stop_criteria(tokenizer, start: int, stop: Sequence[str]):
    """``generate`` ends once the decoded new text (after ``start``) holds one of the tool's
    stop strings (``eval.stop``) that later tokens cannot change (:func:`.metrics.stop_seen`:
    the cut is then the same as after the whole budget); None without stop strings."""
    if not stop:
        return None
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Seen(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = stop_seen(decode(tokenizer, input_ids[0, start:].tolist()), stop)
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool,
                              device=input_ids.device)

    return StoppingCriteriaList([_Seen()])

"""The evaluate job's mechanism check: what ablating the job's heads does to induction itself.

Two numbers, each with the heads ablated and without (nats, lower is better):

- ``repeat_loss``: the mean next-token loss on the repeated part of seeded repeated
  random-token sequences, ``[BOS] + R x repeats`` with ``R`` distinct random tokens, drawn by
  :func:`ih_sweep.heads.scoring.random_sequences` (the prefix score's own generator) and scored on
  every token of repeats 2.. (with ``repeats=2``, the repeated half). Only induction (look
  back for the previous occurrence of the current token, copy what followed it) predicts
  those tokens, so ablating induction heads raises this loss (Olsson et al. 2022, "In-context
  Learning and Induction Heads", https://arxiv.org/abs/2209.11895, section 2 and
  "repeated random tokens").
- ``icl_score``: Olsson et al.'s in-context learning score, "the loss of the 500th token in
  the context minus the average loss of the 50th token in the context, averaged over dataset
  examples" (same paper, section 2, "In-context learning score"); negative when later tokens
  are predicted better thanks to the context. bAbI texts are far shorter than 500 tokens, so
  the positions are scaled to the texts' length keeping the paper's 10:1 ratio
  (:func:`icl_positions`), on the stories' own text (:func:`story_text`). The paper averages
  single tokens over diverse natural text; bAbI's lines are so regular that a fixed index
  falls on the same kind of word in every story (``to`` at index 10 in 44 of 64 generated
  stories), so by default each position is the mean loss over a window of a tenth of the
  text (:func:`icl_windows`; ``mechanism.icl_window=1`` gives the paper's single tokens).
  That text is what a model trained on natural text predicts; the bundled tiny model was
  trained on repeated random sequences and on the answers of bAbI prompts only (the loss on
  every other token masked, :mod:`ih_sweep.model.tiny`), so on story text its early losses
  lie above the uniform log V and the score mostly re-measures repetition. With
  ``mechanism.icl_tokens=answers`` (``auto``'s choice for ``model.path=builtin:tiny``) the
  score is taken on the tokens such a model is trained to predict instead: each story in the
  notebook's format with every answer filled in (its training text, :func:`answers_text`),
  the loss of the last in-context example's answer minus that of the first
  (:func:`answer_positions`): early vs late *examples*, Olsson et al.'s early vs late context
  on the task's own targets. job.json's ``mechanism.icl_tokens`` says which was used.

Pure maths first (token losses, masked means, the ICL score, its positions), then the model
passes, then :func:`mechanism_check`, which the evaluate job calls with its own heads and
ablation method (:func:`ih_sweep.ablation.hooks.ablate_heads`). The unablated numbers and the
passes' inputs depend only on the model, the settings and the texts, so they are computed
once per process for those. Each pass computes the logits of the tokens its numbers read
only (:func:`losses_at`), through the evaluator's shortcuts and its store of unablated
layers (:func:`ih_sweep.evaluation.fastpath.logits.logits_at`): the same losses as the whole
plain forward to float32 rounding (~1e-6 nats), a job's ablated pass taking the layers below
its first ablated one from the unablated pass.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ih_sweep.config.schema import EvalConfig, IclTokens, MechanismConfig
from ih_sweep.data import Story, build_prompt, question_indices

log = logging.getLogger(__name__)

# Olsson et al. 2022's token indices: ICL score = loss(500th token) - loss(50th token)
OLSSON_LATE, OLSSON_EARLY = 500, 50


# --------------------------------------------------------------------------- pure maths
def target_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[b, k] loss in nats of each target token: -log softmax(logits)[target], computed in
    float32 whatever the logits' dtype. logits: [b, k, V], the logits that predict
    ``targets`` [b, k]."""
    logp = torch.log_softmax(logits.float(), -1)
    return -logp.gather(-1, targets[..., None].to(logp.device))[..., 0]


def token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[b, T] next-token loss in nats: entry t is -log p(ids[:, t] | ids[:, :t]), from the
    logits at position t - 1 (:func:`target_losses`); entry 0 (no prediction) is NaN.
    logits: [b, T, V]; ids: [b, T]."""
    nll = target_losses(logits[:, :-1], ids[:, 1:])
    first = torch.full_like(nll[:, :1], float("nan"))
    return torch.cat([first, nll], 1)


def masked_mean(losses: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``losses`` [b, T] over the True entries of ``mask`` [b, T]. Raises
    ValueError when the mask selects nothing."""
    m = mask.to(losses.device, torch.bool)
    if not bool(m.any()):
        raise ValueError("the mask selects no token")
    return float(losses[m].double().mean())


def icl_positions(length: int) -> tuple[int, int]:
    """(early, late) 0-based token indices for texts of ``length`` tokens: late is the last
    token (``length - 1``) and early is late / 10 rounded, at least 1, keeping the ratio of
    Olsson et al.'s 50th and 500th tokens. Raises ValueError below 3 tokens (no two distinct
    predicted positions)."""
    if length < 3:
        raise ValueError(f"texts of {length} tokens are too short for an ICL score "
                         "(at least 3 tokens: two predicted positions)")
    late = length - 1
    early = max(1, round(late * OLSSON_EARLY / OLSSON_LATE))
    return early, late


def icl_windows(length: int, window: int | None = None) -> tuple[range, range]:
    """The token indices averaged at the early and late position of texts of ``length``
    tokens (:func:`icl_positions`): ``window`` tokens each (None: one tenth of the text,
    ``early`` tokens, at least 1), the early window centred on ``early`` (never before
    index 1), the late one ending at ``late``. ``window=1`` is Olsson et al.'s single
    tokens. Raises ValueError when the windows would overlap."""
    early, late = icl_positions(length)
    w = early if window is None else int(window)
    if w < 1:
        raise ValueError(f"icl window={w}: at least 1 token")
    start = max(1, early - w // 2)
    first, last = range(start, start + w), range(late - w + 1, late + 1)
    if first[-1] >= last[0]:
        raise ValueError(f"icl window={w}: the early window {first.start}..{first[-1]} and "
                         f"the late window {last.start}..{last[-1]} overlap in texts of "
                         f"{length} tokens")
    return first, last


def icl_score(losses: torch.Tensor, early: int | Sequence[int], late: int | Sequence[int]
              ) -> float:
    """Olsson et al.'s ICL score: the mean over texts of the loss at ``late`` minus the loss
    at ``early`` (nats; negative = the late tokens are predicted better). ``early`` and
    ``late`` are token indices or windows of them (each averaged per text first). losses:
    [b, T] from :func:`token_losses`."""
    first = [early] if isinstance(early, int) else list(early)
    last = [late] if isinstance(late, int) else list(late)
    if not (first and last and 0 < min(first) and max(first) < min(last)
            and max(last) < losses.shape[1]):
        raise ValueError(f"positions early={first}, late={last} must satisfy "
                         f"0 < early < late < {losses.shape[1]}")
    loss = losses.double()
    return float((loss[:, last].mean(1) - loss[:, first].mean(1)).mean())


def story_text(story: Story) -> str:
    """A story's own text: its lines in order, one a line, each question followed by its
    answer (``Where is Mary? kitchen``); the last line is the story's last question. No
    instruction header: the same words open every prompt, so their tokens need no context,
    and at bAbI's lengths the early ICL position would fall among them."""
    last = question_indices(story)[-1]
    lines = []
    for i in range(last + 1):
        text = story["text"][i]
        lines.append(f"{text} {story['answer'][i]}" if story["type"][i] == 1 else text)
    return "\n".join(lines) + "\n"


ANSWER_CUE = "\nAnswer: "  # what precedes each answer in the notebook's format


def answers_text(story: Story) -> str:
    """A story in the notebook's format (:func:`ih_sweep.data.build_prompt`) up to its last
    question, every answer filled in and a newline after the last: the text the bundled tiny
    model is trained on (:func:`ih_sweep.data.iter_lm_text`)."""
    last = question_indices(story)[-1]
    return build_prompt(story, last) + story["answer"][last] + "\n"


def answer_positions(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """The token ids of ``text`` (with special tokens) and the index of each answer's first
    token: the token after each ``"\nAnswer: "``, found as the token count of the text up to
    there (or up to ``"Answer:"`` where the tokenizer joins the space to the answer's word, as
    BPE tokenizers do). Raises ValueError where neither prefix tokenizes as a prefix of the
    text, or no answer follows."""
    ids = list(tokenizer(text)["input_ids"])
    positions = []
    at = text.find(ANSWER_CUE)
    while at >= 0:
        end = at + len(ANSWER_CUE)
        for prefix in (text[:end], text[:end - 1]):
            head = list(tokenizer(prefix)["input_ids"])
            if ids[:len(head)] == head and len(head) < len(ids):
                positions.append(len(head))
                break
        else:
            raise ValueError(f"the answer after character {end} does not begin a token of "
                             "its own (mechanism.icl_tokens=answers needs one)")
        at = text.find(ANSWER_CUE, end)
    if not positions:
        raise ValueError("no answer in the text (mechanism.icl_tokens=answers)")
    return ids, positions


def answer_inputs(tokenizer, texts: Sequence[str], limit: int | None = None
                  ) -> tuple[torch.Tensor, list[int], list[int]]:
    """[n, L] token ids of ``texts`` right-padded to the longest (L at most ``limit``: a text
    is cut there, and answers past it do not count), and per text the index of its first and
    of its last answer's first token (:func:`answer_positions`). Causal attention: the pads
    after a text change none of its losses. Raises ValueError for no text or a text with
    fewer than two answers."""
    if not texts:
        raise ValueError("no text for the ICL score")
    from ih_sweep.model.tokens import pad_id

    rows, first, last = [], [], []
    for text in texts:
        ids, pos = answer_positions(tokenizer, text)
        if limit:
            ids, pos = ids[:limit], [p for p in pos if p < limit]
        if len(pos) < 2:
            raise ValueError(f"a text with {len(pos)} answer(s): the ICL score on answers "
                             "needs an early and a late in-context example")
        rows.append(ids)
        first.append(pos[0])
        last.append(pos[-1])
    width = max(len(r) for r in rows)
    pad = pad_id(tokenizer)
    return (torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long),
            first, last)


def answer_icl_score(losses: torch.Tensor, first: Sequence[int], last: Sequence[int]
                     ) -> float:
    """The ICL score on answers: the mean over texts of the loss of the last in-context
    example's answer token minus the first one's (nats; negative = the later example is
    predicted better). losses: [b, T] from :func:`token_losses`; ``first``, ``last``: per
    text, the token indices (:func:`answer_inputs`)."""
    rows = torch.arange(losses.shape[0])
    loss = losses.double()
    return float((loss[rows, list(last)] - loss[rows, list(first)]).mean())


# --------------------------------------------------------------------------- model passes
def losses_at(model, ids: torch.Tensor, tokens: torch.Tensor, batch_size: int,
              speed: EvalConfig | None = None) -> torch.Tensor:
    """[b, T] :func:`token_losses` of ``ids`` [b, T] (right-padded or equal-length rows) at
    the token indices ``tokens`` [b, k] (each at least 1), NaN at every other entry; the
    logits come from :func:`ih_sweep.evaluation.fastpath.logits.logits_at` at the positions
    before them, in batches. ``speed``: the job's ``eval`` settings whose shortcuts the pass
    takes (``fast_layers``, ``layer_store_mb``; None: the default shortcuts, no store)."""
    from ih_sweep.evaluation.fastpath.logits import logits_at

    if int(tokens.min()) < 1:
        raise ValueError("token 0 has no prediction (no context before it)")
    targets = ids.gather(1, tokens)
    nll = logits_at(model, ids, tokens - 1, batch_size,
                    None if speed is None else speed.fast_layers,
                    0 if speed is None else speed.layer_store_mb,
                    reduce=lambda logits, rows: target_losses(logits, targets[rows]))
    return torch.full(ids.shape, float("nan")).scatter_(1, tokens, nll)


def repeat_inputs(tokenizer, settings: MechanismConfig, limit: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded repeated sequences [n, (1) + seq_len * repeats] and the mask of their
    repeats 2.. (the tokens scored), from the prefix score's generator. Raises
    :class:`~ih_sweep.config.errors.ConfigError` naming ``mechanism.seq_len`` when a
    sequence exceeds ``limit`` positions or the tokenizer has too few candidate tokens
    (:func:`ih_sweep.heads.scoring.check_repeated_sequences`)."""
    from ih_sweep.heads.scoring import (
        candidate_token_ids,
        check_repeated_sequences,
        random_sequences,
    )

    bos = int(tokenizer.bos_token_id is not None)
    check_repeated_sequences("mechanism", settings.seq_len, settings.repeats, bos, limit)
    candidates = candidate_token_ids(tokenizer, settings.exclude_frequent_frac,
                                     settings.exclude_rare_frac)
    return random_sequences(settings.n_sequences, settings.seq_len, settings.repeats,
                            candidates, tokenizer.bos_token_id, settings.seed, key="mechanism")


def text_inputs(tokenizer, texts: Sequence[str], limit: int | None = None) -> torch.Tensor:
    """[n, L] token ids of ``texts`` cut to a common length L: the shortest text's length
    (and at most ``limit`` positions), so no row is padded and every position is real
    text. Raises ValueError for no text."""
    if not texts:
        raise ValueError("no text for the ICL score")
    rows = [list(tokenizer(t)["input_ids"]) for t in texts]
    length = min(len(r) for r in rows)
    if limit:
        length = min(length, limit)
    return torch.tensor([r[:length] for r in rows], dtype=torch.long)


@dataclass(frozen=True)
class MechanismInputs:
    """What the mechanism check's passes read, built once per model, settings and texts
    (:func:`mechanism_inputs`): the repeated sequences [n, L] with the mask of their scored
    tokens, the ICL texts' token ids [m, T], the ICL score's ``windows`` (:func:`icl_windows`,
    or with ``answers`` the first and last answers' token indices per text,
    :func:`answer_inputs`) and the ``positions`` job.json records."""

    repeat_ids: torch.Tensor
    repeat_mask: torch.Tensor
    text_ids: torch.Tensor
    windows: tuple[Any, Any]
    answers: bool
    positions: dict[str, Any]

    def repeat_tokens(self) -> torch.Tensor:
        """[n, k] the scored tokens' indices per sequence (every sequence has k)."""
        return self.repeat_mask.nonzero()[:, 1].view(self.repeat_mask.shape[0], -1)

    def text_tokens(self) -> torch.Tensor:
        """[m, k] the token indices the ICL score reads per text: the early then the late
        window (the same in every text), or each text's first and last answer."""
        first, last = self.windows
        if self.answers:
            return torch.tensor([list(first), list(last)], dtype=torch.long).T.contiguous()
        return torch.tensor([*first, *last], dtype=torch.long).expand(
            self.text_ids.shape[0], -1)


def mechanism_inputs(tokenizer, settings: MechanismConfig, texts: Sequence[str], tokens: str,
                     limit: int | None) -> MechanismInputs:
    """:class:`MechanismInputs` of ``texts`` (:func:`texts_for` with ``tokens``) for a model
    of ``limit`` positions: :func:`repeat_inputs`, then :func:`answer_inputs` (``tokens`` =
    answers) or :func:`text_inputs` with :func:`icl_windows`."""
    repeat_ids, repeat_mask = repeat_inputs(tokenizer, settings, limit)
    answers = tokens == IclTokens.answers
    if answers:
        text_ids, first, last = answer_inputs(tokenizer, texts, limit)
        windows: tuple[Any, Any] = (first, last)
        positions: dict[str, Any] = {"icl_early": float(sum(first) / len(first)),
                                     "icl_late": float(sum(last) / len(last))}
    else:
        text_ids = text_inputs(tokenizer, texts, limit)
        early, late = icl_positions(text_ids.shape[1])
        windows = icl_windows(text_ids.shape[1], settings.icl_window)
        positions = {"icl_early": early, "icl_late": late,
                     "icl_early_tokens": [windows[0].start, windows[0][-1]],
                     "icl_late_tokens": [windows[1].start, windows[1][-1]]}
    return MechanismInputs(repeat_ids, repeat_mask, text_ids, windows, answers, positions)


def measure(model, inputs: MechanismInputs, batch_size: int, speed: EvalConfig | None = None
            ) -> dict[str, float]:
    """``repeat_loss`` and ``icl_score`` (nats) of the model as it is (any ablation hooks
    active stay active) on ``inputs``, each from the losses of the tokens it reads only
    (:func:`losses_at`; ``speed``: its shortcuts)."""
    score = answer_icl_score if inputs.answers else icl_score
    repeat = losses_at(model, inputs.repeat_ids, inputs.repeat_tokens(), batch_size, speed)
    text = losses_at(model, inputs.text_ids, inputs.text_tokens(), batch_size, speed)
    return {"repeat_loss": masked_mean(repeat, inputs.repeat_mask),
            "icl_score": score(text, *inputs.windows)}


# model -> {key of the settings and texts: (the tokenizer, the inputs it made, measure() of
# the unablated model)}; weakly keyed, so an entry lives as long as its model
_UNABLATED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MAX_CACHED = 16  # entries per model


def reset() -> None:
    """Forget the inputs and unablated measures cached in this process
    (:func:`mechanism_check`)."""
    _UNABLATED.clear()


def texts_for(stories: Iterable[Story], n: int, tokens: str = IclTokens.text) -> list[str]:
    """The ICL score's texts of the first ``n`` stories: :func:`story_text` (``tokens``
    text), or :func:`answers_text` (answers; only stories with two questions or more)."""
    out = []
    for story in stories:
        if len(out) >= n:
            break
        if tokens == IclTokens.answers:
            if len(question_indices(story)) >= 2:
                out.append(answers_text(story))
        else:
            out.append(story_text(story))
    return out


def icl_tokens(settings: MechanismConfig, model_path: str) -> str:
    """``mechanism.icl_tokens`` resolved: ``auto`` is answers for the bundled tiny model
    (``model.path=builtin:tiny``, trained on bAbI answers only), text for any other."""
    if settings.icl_tokens != IclTokens.auto:
        return str(settings.icl_tokens)
    return str(IclTokens.answers if model_path == "builtin:tiny" else IclTokens.text)


def mechanism_check(model, tokenizer, settings: MechanismConfig, texts: Sequence[str],
                    heads: Sequence[tuple[int, int]],
                    method: Any = "zero", means: Any = None,
                    model_key: str = "", tokens: str = IclTokens.text,
                    speed: EvalConfig | None = None) -> dict[str, Any]:
    """The job record's ``mechanism`` entry: ``repeat_loss``, ``repeat_loss_unablated``,
    ``icl_score``, ``icl_score_unablated`` (nats), with ``heads`` ablated by ``method``
    (a registered name or method, :func:`ih_sweep.ablation.registry.get_ablation`; ``means``:
    its fill) in the first and third, plus the settings and positions
    used. No heads: ablated = unablated, one pass. The unablated pass is cached in-process
    for the model and tokenizer (by identity), ``model_key`` (e.g. the model's load cache
    key), the settings and the texts, with its inputs (:func:`mechanism_inputs`).
    ``tokens``: what the ICL score compares (``text`` or ``answers``, :func:`icl_tokens`;
    ``texts`` from :func:`texts_for` with the same). ``speed``: the job's ``eval``
    settings, whose shortcuts and store of unablated layers the passes use
    (:func:`losses_at`)."""
    from ih_sweep.ablation.hooks import ablate_heads
    from ih_sweep.model.architecture import position_limit

    semantic = {k: getattr(settings, k) for k in ("n_sequences", "seq_len", "repeats", "seed",
                                                  "exclude_frequent_frac", "exclude_rare_frac",
                                                  "n_texts", "icl_window")}
    semantic["icl_tokens"] = str(tokens)
    key = hashlib.sha256(json.dumps([model_key, semantic, list(texts)], default=str)
                         .encode()).hexdigest()
    cache = _UNABLATED.setdefault(model, {})
    cached = cache.get(key)
    if cached is None or cached[0] is not tokenizer:  # made for this model and tokenizer only
        inputs = mechanism_inputs(tokenizer, settings, texts, tokens,
                                  position_limit(model.config))
        cached = tokenizer, inputs, measure(model, inputs, settings.batch_size, speed)
        if len(cache) >= _MAX_CACHED:
            cache.pop(next(iter(cache)))
        cache[key] = cached
    _, inputs, base = cached
    if heads:
        with ablate_heads(model, heads, method, means):
            ablated = measure(model, inputs, settings.batch_size, speed)
    else:
        ablated = dict(base)
    values = {"repeat_loss": ablated["repeat_loss"],
              "repeat_loss_unablated": base["repeat_loss"],
              "icl_score": ablated["icl_score"], "icl_score_unablated": base["icl_score"]}
    for name, value in values.items():
        if not math.isfinite(value):  # kept out of job.json (JSON has no NaN)
            log.warning("mechanism check: %s is %s (the model's logits are not finite); "
                        "recorded as null", name, value)
            values[name] = None
    return {**values, **copy.deepcopy(inputs.positions),
            "icl_context_tokens": int(inputs.text_ids.shape[1]),
            "icl_texts": int(inputs.text_ids.shape[0]),
            "repeat_tokens_scored": int(inputs.repeat_mask.sum()), **semantic}

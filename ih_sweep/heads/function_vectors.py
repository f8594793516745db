"""Function-vector (FV) head scores: each head's average indirect effect (AIE) on the task's
own prompts.

Source followed: Todd et al. 2024, "Function Vectors in Large Language Models" (ICLR 2024,
arXiv:2310.15213), section 2.1, and their code, github.com/ericwtodd/function_vectors at
fb9eac7: ``src/utils/extract_utils.py`` ``get_mean_head_activations`` (the head means),
``src/compute_indirect_effect.py`` ``compute_indirect_effect`` and
``activation_replacement_per_class_intervention`` with ``last_token_only=True`` (the
indirect effects), ``src/utils/intervention_utils.py`` ``replace_activation_w_avg`` (the
patch: the head's slice of the attention output projection's input at the final token),
``src/utils/prompt_utils.py`` ``word_pairs_to_prompt_data(shuffle_labels=True)`` (the
corrupted prompts), ``src/evaluate_function_vector.py`` (the defaults: 100 prompts for the
means, 25 for the indirect effects, both drawn among queries the model answers correctly,
its ``filter_set``). Yin & Steinhardt 2025 ("Which Attention Heads Matter for In-Context
Learning?", ICML 2025; github.com/kayoyin/icl-heads ``src/find_fv_heads.py``) score FV
heads the same way.

Definition, per head (layer l, query head h), in the project's terms:

- Prompts: items of stories held out from the evaluated ones (``scoring.fv_reference=heldout``,
  the default, :mod:`ih_sweep.data.heldout`), or the job's own items (``evaluated``; in
  sample, as before issue #30), made as the job's are
  (:func:`ih_sweep.data.items_for`). A prompt's *demonstrations*
  are its answered questions: with ``eval.format=notebook`` the story's earlier questions
  with their answers, with ``helm``/``lm_eval`` the ``eval.n_shots`` demo blocks. Both
  formats write a demonstration's answer as ``"\\nAnswer: <answer>\\n"`` and leave the asked
  one open (:func:`demo_answer_spans` finds them and checks their number against
  ``Item.examples_before``). A prompt is *usable* when it has at least 2 demonstrations
  with at least 2 different answers (otherwise no shuffle changes it): prompts with fewer
  are skipped, and so are prompts whose gold answer has no token of its own (a tokenizer
  that drops the word). With ``scoring.fv_correct_only`` (Todd et al.'s ``filter_set``),
  also only prompts whose clean greedy next token is the gold answer's first token.
- Corrupted prompt p~: the prompt with its demonstrations' answers permuted
  (:func:`shuffled_order`): a uniform draw among the permutations that leave no
  demonstration with its own answer text (rejection sampling from
  ``numpy.random.default_rng([fv_seed, story, question])``, up to :data:`DRAWS` draws; then
  a constructive one), so shuffling changes every demonstration's answer whenever that is
  possible (no answer text on more than half of them); otherwise the fewest such fixed
  points found. Todd et al. draw a plain ``np.random.permutation``, fixed points allowed.
  The asked question and everything else stay as they are.
- The usable prompts are ordered by a seeded permutation (``fv_seed``); the first
  ``fv_mean_prompts`` accepted give the head means, the next ``fv_prompts`` are corrupted
  (two disjoint sets; Todd et al. draw them independently).
- Head mean: a_bar[l, h] = mean over the clean mean prompts of z[l, h] at the final prompt
  token, where z[l, h] is the head's slice of the o_proj input
  (:func:`ih_sweep.model.sites.hook_z`; [head_dim] in the model's units).
- Indirect effect on a corrupted prompt: CIE[l, h](p~) = P(y | p~, z[l, h]_final := a_bar[l, h])
  - P(y | p~), where P is the softmax of the next-token logits at the final token and y the
  gold answer's first token as it follows the prompt
  (:func:`ih_sweep.evaluation.rows.answer_tokens`,
  the evaluator's own tokenization; the corrupted prompt ends as the clean one does).
- FV score: AIE[l, h] = mean over the ``fv_prompts`` corrupted prompts of CIE[l, h]. Units:
  a probability difference, in [-1, 1]. Its standard error over the corrupted prompts
  (``fv_se``, :func:`ih_sweep.heads.stability.standard_error`: std of CIE[l, h] with
  ddof=1 over sqrt(fv_prompts)) and the top-N set's bootstrap stability over them
  (:mod:`ih_sweep.heads.stability`) say how far the ranking rests on these prompts.

Batching: the clean prompts run ``fv_batch_size`` at a time, left-padded with position ids
from the mask (:func:`ih_sweep.model.positions.positions_from_mask`), so the final token is
the last column in every row; each corrupted prompt runs as one unpadded batch of copies,
one row unpatched and every other row patching one head (Todd et al.'s ``batched_input``),
``fv_batch_size`` rows a pass. The scores do not depend on the batch size (tested).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ih_sweep.config.errors import UserError
from ih_sweep.config.schema import ScoringConfig
from ih_sweep.data import Item
from ih_sweep.model.positions import positions_from_mask
from ih_sweep.model.sites import head_sites, hook_z
from ih_sweep.model.tokens import pad_id

log = logging.getLogger(__name__)

# fv_se: the AIE's standard error over the corrupted prompts (ih_sweep.heads.stability)
FV_COLUMNS = ["model", "layer", "head", "fv", "fv_prompts", "fv_mean_prompts", "fv_seed",
              "fv_correct_only", "fv_se"]
DRAWS = 1000  # rejection-sampling draws of a prompt's answer permutation
CPU_FV_ROWS = 64  # scoring.fv_batch_size=auto on CPU: rows a pass
_ANSWER = re.compile(r"(?<=\nAnswer: )[^\n]*(?=\n)")


class FunctionVectorError(UserError):
    """Settings from which no FV score can be computed (too few usable prompts)."""

    kind = "config"


# --------------------------------------------------------------------------- pure parts
def demo_answer_spans(prompt: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the demonstrations' answers in ``prompt``: the text
    between ``"\\nAnswer: "`` and the next newline (the notebook's and HELM/lm-eval's
    formats both write answered questions so; the asked one ends the prompt, unanswered)."""
    return [m.span() for m in _ANSWER.finditer(prompt)]


def shuffled_order(answers: Sequence[str], rng: np.random.Generator, draws: int = DRAWS
                   ) -> list[int]:
    """A permutation ``perm`` of the demonstrations (demonstration i gets answer
    ``answers[perm[i]]``) with no demonstration keeping its own answer text where that is
    possible: uniform among such permutations by rejection (up to ``draws`` draws of
    ``rng.permutation``); if none was drawn and no answer text is on more than half of the
    demonstrations, a constructive one (positions sorted by answer, in a random order of
    the answers, each given the answer ``m`` places on, ``m`` the largest count of one
    answer); else the draw with the fewest fixed points."""
    n = len(answers)
    values = sorted(set(answers))
    m = max((list(answers).count(v) for v in values), default=0)
    least = max(0, 2 * m - n)  # no permutation leaves fewer fixed points
    best, fewest = list(range(n)), n + 1
    for _ in range(draws if n > 1 else 0):
        perm = rng.permutation(n)
        fixed = sum(answers[p] == answers[i] for i, p in enumerate(perm))
        if fixed < fewest:
            best, fewest = [int(p) for p in perm], fixed
        if fixed == least:
            return best
    if n > 1 and least == 0:
        rank = {v: int(r) for v, r in zip(values, rng.permutation(len(values)))}
        order = sorted(range(n), key=lambda i: rank[answers[i]])
        perm = [0] * n
        for k, i in enumerate(order):
            perm[i] = order[(k + m) % n]
        return perm
    return best


def corrupt(prompt: str, spans: Sequence[tuple[int, int]], perm: Sequence[int]) -> str:
    """``prompt`` with the answer at ``spans[i]`` replaced by the one at ``spans[perm[i]]``."""
    answers = [prompt[a:b] for a, b in spans]
    out, last = [], 0
    for (a, b), p in zip(spans, perm):
        out += [prompt[last:a], answers[p]]
        last = b
    return "".join(out) + prompt[last:]


@dataclass(frozen=True)
class Candidate:
    """A usable prompt: its item, its corrupted prompt and how many demonstrations kept
    their own answer text (0 wherever avoidable)."""

    item: Item
    corrupted: str
    fixed_points: int


def candidates(items: Sequence[Item], seed: int) -> tuple[list[Candidate], dict[str, int]]:
    """The usable prompts of ``items`` in the seeded order of the module docstring, and how
    many were skipped and why (``few_demos``: < 2 demonstrations; ``one_answer``: a single
    answer text among them). Raises ValueError where a prompt's answered questions do not
    number ``examples_before`` (a format this module cannot read)."""
    out, skipped = [], {"few_demos": 0, "one_answer": 0}
    for it in items:
        spans = demo_answer_spans(it.prompt)
        if len(spans) != it.examples_before:
            raise ValueError(f"story {it.story_index} question {it.question_index}: "
                             f"{len(spans)} answered questions found in the prompt, "
                             f"{it.examples_before} expected")
        answers = [it.prompt[a:b] for a, b in spans]
        if len(spans) < 2:
            skipped["few_demos"] += 1
            continue
        if len(set(answers)) < 2:
            skipped["one_answer"] += 1
            continue
        rng = np.random.default_rng([seed, it.story_index, it.question_index])
        perm = shuffled_order(answers, rng)
        fixed = sum(answers[p] == answers[i] for i, p in enumerate(perm))
        out.append(Candidate(it, corrupt(it.prompt, spans, perm), fixed))
    order = np.random.default_rng(seed).permutation(len(out))
    return [out[i] for i in order], skipped


# --------------------------------------------------------------------------- model passes
@dataclass
class FunctionVectorResult:
    """What :func:`function_vector_scores` computed. ``aie``: [layers, heads] float64
    (probability difference); ``effects``: [prompts, layers, heads] float64, each corrupted
    prompt's CIE; ``baseline``: [prompts] P(y | p~) unpatched; ``means``: per layer the
    head means [heads * head_dim] float32 (o_proj input units); ``mean_items`` and
    ``corrupted``: the prompts used."""

    aie: np.ndarray
    effects: np.ndarray
    baseline: np.ndarray
    means: dict[int, torch.Tensor]
    mean_items: list[Item]
    corrupted: list[Candidate]
    skipped: dict[str, int]


def batch_rows(value: int | str, model, tokens: int) -> int:
    """``scoring.fv_batch_size`` as rows a pass: a number as it is; ``auto``:
    :data:`CPU_FV_ROWS` off CUDA, on CUDA what fits for rows of ``tokens`` tokens without a
    KV cache (:func:`ih_sweep.model.batching.rows_per_batch`)."""
    from ih_sweep.model import batching

    if value != batching.AUTO:
        return max(1, int(value))
    device = next(model.parameters()).device
    if device.type != "cuda":
        return CPU_FV_ROWS
    free = batching.free_device_bytes(device)
    return batching.rows_per_batch(free, batching.model_shape(model.config),
                                   batching.compute_dtype_bytes(model), tokens, reads=1,
                                   kv_cache=False)


def first_answer_token(tokenizer, item: Item) -> int | None:
    """The gold answer's first token as it follows ``item.prompt`` (the evaluator's), None
    where the answer has no token of its own (a tokenizer that drops it)."""
    from ih_sweep.evaluation.rows import answer_tokens, prompt_tail

    tail = prompt_tail(item.prompt)
    cont, _ = answer_tokens(tokenizer, [tail], [item.target])[tail, item.target]
    return int(cont[0]) if cont else None


@torch.no_grad()
def clean_final(model, tokenizer, prompts: Sequence[str], rows: int
                ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Each prompt's o_proj inputs at its final token ({layer: [prompts, heads * head_dim]}
    float32, CPU) and its greedy next token ([prompts]), left-padded batches of ``rows``."""
    sites = head_sites(model)
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    encoded = [list(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    z: dict[int, list[torch.Tensor]] = {i: [] for i in range(sites.n_layers)}
    greedy = []
    with hook_z(sites, lambda i, x: z[i].append(x[:, -1].float().cpu())):
        for start in range(0, len(encoded), rows):
            chunk = encoded[start:start + rows]
            width = max(len(e) for e in chunk)
            ids = torch.tensor([[pad] * (width - len(e)) + e for e in chunk])
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in chunk])
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                        position_ids=positions_from_mask(mask).to(device), use_cache=False,
                        logits_to_keep=1)
            greedy.append(out.logits[:, -1].float().argmax(-1).cpu())
    return ({i: torch.cat(v) for i, v in z.items()},
            torch.cat(greedy) if greedy else torch.zeros(0, dtype=torch.long))


@torch.no_grad()
def patched_probs(model, ids: Sequence[int], target: int, means: dict[int, torch.Tensor],
                  rows: int) -> tuple[float, np.ndarray]:
    """P(target) at the final token of the unpadded prompt ``ids``, unpatched and with each
    head's final-token output set to its mean (``means``: {layer: [heads * head_dim]}):
    (unpatched, [layers, heads]). Rows of one pass: copies of the prompt, row r patching
    one head (row 0 of the first pass unpatched), ``rows`` a pass.

    The tokens before the final one are the same in every row and no patch reaches them
    (causal attention; only the final token is patched), so they run once into a key/value
    cache (the evaluator's
    :func:`~ih_sweep.evaluation.decoding.reusable_cache`) and each pass feeds
    the final token alone, the cache's rows copied from that one; where the model's cache
    cannot be reused exactly, every pass runs the whole prompt."""
    from ih_sweep.evaluation.decoding import cache_argument, reusable_cache

    sites = head_sites(model)
    device = next(model.parameters()).device
    L, H, d = sites.n_layers, sites.heads_per_layer, sites.head_dim
    jobs: list[tuple[int, int] | None] = [None] + [(la, h) for la in range(L) for h in range(H)]
    probs: list[float] = []
    current: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def patch(layer: int, z: torch.Tensor) -> torch.Tensor | None:
        if layer not in current:
            return None
        row, heads = current[layer]
        x = z.clone()
        cols = heads.to(x.device)[:, None] * d + torch.arange(d, device=x.device)  # [k, d]
        fill = means[layer].to(device=x.device, dtype=x.dtype)[cols]
        x[row.to(x.device)[:, None], -1, cols] = fill
        return x

    tokens = torch.tensor([list(ids)], device=device)
    width = tokens.shape[1]
    cache = reusable_cache(model, width, 1) if width > 1 else None
    arg = cache_argument(model)
    if cache is not None:  # the shared prefix, once
        model(input_ids=tokens[:, :-1], use_cache=True, logits_to_keep=1, **{arg: cache})
    with hook_z(sites, patch):
        for start in range(0, len(jobs), rows):
            chunk = jobs[start:start + rows]
            current.clear()
            for r, job in enumerate(chunk):
                if job is not None:
                    current.setdefault(job[0], ([], []))
                    current[job[0]][0].append(r)
                    current[job[0]][1].append(job[1])
            for la, (rs, hs) in list(current.items()):
                current[la] = (torch.tensor(rs), torch.tensor(hs))
            n = len(chunk)
            if cache is None:
                out = model(input_ids=tokens.expand(n, -1), use_cache=False, logits_to_keep=1)
            else:
                rows_cache = copy.deepcopy(cache)  # the prefix's, for this pass's rows
                rows_cache.batch_select_indices(torch.zeros(n, dtype=torch.long,
                                                            device=device))
                out = model(input_ids=tokens[:, -1:].expand(n, -1),
                            position_ids=torch.full((n, 1), width - 1, device=device),
                            use_cache=True, logits_to_keep=1, **{arg: rows_cache})
            logits = out.logits[:, -1]
            probs += torch.softmax(logits.float(), -1)[:, target].double().cpu().tolist()
    base = probs[0]
    return base, np.asarray(probs[1:], dtype=np.float64).reshape(L, H) - base


def function_vector_scores(model, tokenizer, items: Sequence[Item], settings: ScoringConfig,
                           progress: bool = False) -> FunctionVectorResult:
    """Every head's FV score (AIE, module docstring) on ``items`` with ``settings``'
    ``fv_prompts``, ``fv_mean_prompts``, ``fv_seed``, ``fv_correct_only`` and
    ``fv_batch_size``. The model must be unablated. Raises :class:`FunctionVectorError`
    where fewer usable prompts exist than the two sets need."""
    from tqdm.auto import tqdm

    need = settings.fv_mean_prompts + settings.fv_prompts
    pool, skipped = candidates(items, settings.fv_seed)
    longest = max((len(tokenizer(c.item.prompt)["input_ids"]) for c in pool[:need]),
                  default=1)
    rows = batch_rows(settings.fv_batch_size, model, longest)
    targets: dict[Candidate, int | None] = {}
    skipped["no_answer_token"] = 0
    accepted: list[Candidate] = []
    finals: dict[int, list[torch.Tensor]] = {}
    wrong = 0
    for start in range(0, len(pool), max(rows, need)):  # clean passes until enough accepted
        part = pool[start:start + max(rows, need)]
        z, greedy = clean_final(model, tokenizer, [c.item.prompt for c in part], rows)
        for k, c in enumerate(part):
            targets[c] = first_answer_token(tokenizer, c.item)
            if targets[c] is None:
                skipped["no_answer_token"] += 1
                continue
            if settings.fv_correct_only and int(greedy[k]) != targets[c]:
                wrong += 1
                continue
            if len(accepted) < need:
                accepted.append(c)
                for i, v in z.items():
                    finals.setdefault(i, []).append(v[k])
        if len(accepted) >= need:
            break
    skipped["wrong"] = wrong
    if len(accepted) < need:
        right = " the model answers right (scoring.fv_correct_only)" \
            if settings.fv_correct_only else ""
        raise FunctionVectorError(
            f"scoring.fv_prompts={settings.fv_prompts}: FV scores need fv_mean_prompts + "
            f"fv_prompts = {need} prompts with >= 2 demonstrations of different answers"
            f"{right}; the job's {len(items)} prompts have {len(accepted)} ({skipped['few_demos']}"
            f" with < 2 demonstrations, {skipped['one_answer']} with one answer, "
            f"{skipped['no_answer_token']} whose answer has no token, {wrong} answered wrong); "
            "allowed: fewer, or more data.n_stories")
    n_mean = settings.fv_mean_prompts
    means = {i: torch.stack(v[:n_mean]).mean(0) for i, v in finals.items()}
    corrupted = accepted[n_mean:]
    sites = head_sites(model)
    effects = np.zeros((len(corrupted), sites.n_layers, sites.heads_per_layer))
    baseline = np.zeros(len(corrupted))
    for p, c in enumerate(tqdm(corrupted, desc="FV scores", disable=not progress)):
        ids = tokenizer(c.corrupted)["input_ids"]
        baseline[p], effects[p] = patched_probs(model, ids, targets[c], means, rows)
    fixed = sum(c.fixed_points > 0 for c in corrupted)
    log.info("FV scores: head means over %d clean prompts, indirect effects on %d corrupted "
             "ones (%d with a demonstration keeping its answer: unavoidable); skipped %s",
             n_mean, len(corrupted), fixed, skipped)
    return FunctionVectorResult(effects.mean(0), effects, baseline, means,
                                [c.item for c in accepted[:n_mean]], corrupted, skipped)


def fv_table(result: FunctionVectorResult, settings: ScoringConfig, model_name: str
             ) -> pd.DataFrame:
    """The FV score table: one row per head, columns :data:`FV_COLUMNS`."""
    from ih_sweep.heads.stability import standard_error

    L, H = result.aie.shape
    se = standard_error(result.effects)
    return pd.DataFrame(
        [(model_name, la, h, float(result.aie[la, h]), settings.fv_prompts,
          settings.fv_mean_prompts, settings.fv_seed, settings.fv_correct_only,
          float(se[la, h]))
         for la in range(L) for h in range(H)], columns=FV_COLUMNS)

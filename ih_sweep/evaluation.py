"""Fast, seed-faithful bAbI evaluation.

The seed generated 3 greedy tokens for one story at a time. Here each item is first decided
by one batched teacher-forced forward pass: feeding the prompt plus a candidate continuation
(the gold answer and what follows it) reveals the greedy tokens for as long as they agree
with the candidate. When those known tokens already settle the metric the item is done;
otherwise it falls back to real greedy generation. Either way the outcome is what
one-story-at-a-time ``generate`` gives. With scope ``all``, every question of a story whose
prompt tokenizes as a prefix of the story's full text is read off one shared forward pass.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .data import Item

log = logging.getLogger(__name__)

METRICS = ("contains", "exact")
SCOPES = ("last", "all")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class EvalSettings:
    metric: str = "contains"
    scope: str = "last"
    max_new_tokens: int = 3
    batch_size: int = 32
    progress: bool = True


@dataclass
class ItemResult:
    item: Item
    continuation: str
    correct: bool
    decided_by: str  # "forward" or "generate"


# --------------------------------------------------------------------------- metric (pure)
def words(text: str) -> list[str]:
    return _WORD.findall(text)


def is_correct(continuation: str, answer: str, metric: str) -> bool:
    """``contains`` (the seed's): every comma-separated part of the answer is one of the
    ``\\w+`` words of the continuation; ``exact``: the first words equal the answer parts."""
    parts = [p.strip() for p in answer.split(",") if p.strip()]
    got = words(continuation)
    if metric == "contains":
        return all(p in got for p in parts)
    if metric == "exact":
        return got[:len(parts)] == parts
    raise ValueError(f"eval.metric={metric!r}; allowed values: {', '.join(METRICS)}")


def decide_partial(text: str, answer: str, metric: str) -> bool | None:
    """Outcome from a known *prefix* of the greedy continuation, or None if later tokens could
    still change it. Words followed by a non-word character can no longer change."""
    got = words(text)
    if text and (text[-1].isalnum() or text[-1] == "_"):
        got = got[:-1]  # the last word may still grow
    parts = [p.strip() for p in answer.split(",") if p.strip()]
    if metric == "contains":
        return True if all(p in got for p in parts) else None
    if len(got) >= len(parts):
        return got[:len(parts)] == parts
    if got and got != parts[:len(got)]:
        return False
    return None


# --------------------------------------------------------------------------- rows
@dataclass
class _Query:
    index: int  # into items
    pos: int  # position of the prompt's last token in the row
    teacher: list[int]  # candidate continuation tokens fed after the prompt


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def build_rows(tokenizer, items: Sequence[Item], max_new_tokens: int
               ) -> list[tuple[list[int], list[_Query]]]:
    """Token rows to run, each answering one or more items (shared story prefixes)."""
    by_story: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_story.setdefault(it.story_index, []).append(i)
    rows: list[tuple[list[int], list[_Query]]] = []
    need = max_new_tokens - 1
    for idxs in by_story.values():
        idxs = sorted(idxs, key=lambda i: items[i].line)
        last = items[idxs[-1]]
        prompt_ids = _encode(tokenizer, last.prompt)
        full = _encode(tokenizer, last.prompt + last.answer + "\n")
        if full[:len(prompt_ids)] != prompt_ids:
            full = prompt_ids + _continuation(tokenizer, last.answer)
        row = full[:len(prompt_ids) + need]
        queries = [_Query(idxs[-1], len(prompt_ids) - 1, row[len(prompt_ids):])]
        for i in idxs[:-1]:
            ids = _encode(tokenizer, items[i].prompt)
            if row[:len(ids)] == ids:
                queries.append(_Query(i, len(ids) - 1, row[len(ids):len(ids) + need]))
            else:  # tokenization differs at the boundary: the item gets its own row
                own = ids + _continuation(tokenizer, items[i].answer)[:need]
                rows.append((own, [_Query(i, len(ids) - 1, own[len(ids):])]))
        rows.append((row, queries))
    return rows


def _continuation(tokenizer, answer: str) -> list[int]:
    return list(tokenizer(answer + "\n", add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------- model passes
def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id)


@torch.no_grad()
def _greedy_from_forward(model, rows, pad_id: int, max_new_tokens: int, device
                         ) -> dict[int, list[int]]:
    """For each query: the argmax tokens at its positions (prompt end, then each teacher)."""
    width = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions: list[list[int]] = []
    for b, (row, queries) in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
        mask[b, :len(row)] = 1
        pos = []
        for q in queries:
            pos.extend(q.pos + j for j in range(min(max_new_tokens, len(q.teacher) + 1)))
        positions.append(pos)
    k = max(len(p) for p in positions)
    gather = torch.zeros((len(rows), k), dtype=torch.long)
    for b, pos in enumerate(positions):
        gather[b, :len(pos)] = torch.tensor(pos)
    gather = gather.to(device)
    unembed = model.get_output_embeddings()

    def pick(module, args):  # compute logits only where they are needed
        h = args[0]
        idx = gather[:, :, None].expand(-1, -1, h.shape[-1])
        return (torch.gather(h, 1, idx), *args[1:])

    handle = unembed.register_forward_pre_hook(pick)
    try:
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       use_cache=False).logits
    finally:
        handle.remove()
    top = logits.argmax(-1).cpu()
    out: dict[int, list[int]] = {}
    for b, (_, queries) in enumerate(rows):
        cursor = 0
        for q in queries:
            n = min(max_new_tokens, len(q.teacher) + 1)
            out[q.index] = top[b, cursor:cursor + n].tolist()
            cursor += n
    return out


def _known_greedy(argmax: list[int], teacher: list[int], eos: int | None) -> list[int]:
    """Greedy tokens that are certain: each is known while the previous matched the teacher."""
    known = [argmax[0]]
    for j in range(1, len(argmax)):
        if known[-1] != teacher[j - 1] or known[-1] == eos:
            break
        known.append(argmax[j])
    return known


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                    device) -> list[list[int]]:
    """Real greedy generation, batched with left padding (the fallback)."""
    pad_id = _pad_id(tokenizer)
    encoded = [_encode(tokenizer, p) for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, e in enumerate(encoded):
        ids[b, width - len(e):] = torch.tensor(e)
        mask[b, width - len(e):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
    gen = out[:, width:].cpu().tolist()
    return [_cut_at_eos(g, tokenizer.eos_token_id) for g in gen]


def _cut_at_eos(tokens: list[int], eos: int | None) -> list[int]:
    if eos is not None and eos in tokens:
        return tokens[:tokens.index(eos) + 1]
    return tokens


def _decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _run_batches(fn, work: list, batch_size: int, desc: str, progress: bool):
    """Apply fn to batches of work; on CUDA out-of-memory halve the batch and go on."""
    results = []
    start = 0
    bs = max(1, batch_size)
    bar = tqdm(total=len(work), desc=desc, disable=not progress, leave=False)
    while start < len(work):
        chunk = work[start:start + bs]
        try:
            results.append(fn(chunk))
        except torch.cuda.OutOfMemoryError:
            if bs == 1:
                raise
            bs = max(1, len(chunk) // 2)
            torch.cuda.empty_cache()
            log.warning("CUDA out of memory: batch size halved to %d", bs)
            continue
        start += len(chunk)
        bar.update(len(chunk))
    bar.close()
    return results


def evaluate(model, tokenizer, items: Sequence[Item], settings: EvalSettings
             ) -> list[ItemResult]:
    """Greedy-decoding outcome of every item, identical to one-at-a-time ``generate``."""
    if settings.metric not in METRICS:
        raise ValueError(f"eval.metric={settings.metric!r}; allowed values: {', '.join(METRICS)}")
    t0 = time.time()
    device = _device(model)
    budget = settings.max_new_tokens
    pad_id = _pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    rows = build_rows(tokenizer, items, budget)
    rows.sort(key=lambda r: len(r[0]))  # similar lengths together: less padding
    teacher = {q.index: q.teacher for _, qs in rows for q in qs}
    known: dict[int, list[int]] = {}
    for part in _run_batches(lambda chunk: _greedy_from_forward(model, chunk, pad_id, budget,
                                                                device),
                             rows, settings.batch_size, "evaluate", settings.progress):
        for idx, argmax in part.items():
            known[idx] = _known_greedy(argmax, teacher[idx], eos)
    results: dict[int, ItemResult] = {}
    undecided: list[int] = []
    for idx, toks in known.items():
        text = _decode(tokenizer, toks)
        it = items[idx]
        if len(toks) >= budget or (eos is not None and toks[-1] == eos):
            results[idx] = ItemResult(it, text, is_correct(text, it.answer, settings.metric),
                                      "forward")
            continue
        verdict = decide_partial(text, it.answer, settings.metric)
        if verdict is None:
            undecided.append(idx)
        else:
            results[idx] = ItemResult(it, text, verdict, "forward")
    if undecided:
        undecided.sort(key=lambda i: len(items[i].prompt))
        gens = _run_batches(
            lambda chunk: generate_greedy(model, tokenizer, [items[i].prompt for i in chunk],
                                          budget, device),
            undecided, settings.batch_size, "generate", settings.progress)
        flat = [g for part in gens for g in part]
        for idx, toks in zip(undecided, flat):
            text = _decode(tokenizer, toks)
            results[idx] = ItemResult(items[idx], text,
                                      is_correct(text, items[idx].answer, settings.metric),
                                      "generate")
    log.info("evaluated %d items in %.1f s (%d by generation)", len(items), time.time() - t0,
             len(undecided))
    return [results[i] for i in range(len(items))]


@torch.no_grad()
def generate_one_at_a_time(model, tokenizer, item: Item, max_new_tokens: int = 3) -> str:
    """The seed's method for one item (reference for tests and benchmarks)."""
    device = _device(model)
    enc = torch.tensor([_encode(tokenizer, item.prompt)], device=device)
    out = model.generate(enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=_pad_id(tokenizer), temperature=None, top_p=None,
                         top_k=None)
    return _decode(tokenizer, _cut_at_eos(out[0, enc.shape[1]:].tolist(),
                                          tokenizer.eos_token_id))

"""The evaluator's token rows: which tokens each forward pass feeds and where it reads.

if TYPE_CHECKING:  # annotations only (the items' type)
    from ih_sweep.data import Item

Each item is decided by a teacher-forced pass over its prompt plus a candidate continuation
(the gold answer and what follows it); with scope ``all``, every question of a story whose
prompt tokenizes as a prefix of the story's full text is read off one shared row
(:func:`build_rows`). :func:`answer_tokens` gives the gold answer's tokens as they follow a
prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only (the items' type)
    from ih_sweep.data import Item


@dataclass
class Query:
    """One item read off a row: where its prompt ends, what the row feeds after it, its
    gold answer's tokens and the other candidates' first tokens."""

    index: int  # into items
    pos: int  # position of the prompt's last token in the row
    teacher: list[int]  # candidate continuation tokens fed after the prompt
    # the gold answer's tokens as they follow the prompt in the row (their log-probs are
    # read at pos, pos + 1, ...), and the first tokens of the other candidate answers
    answer: list[int] = field(default_factory=list)
    others: list[int] = field(default_factory=list)
    story: int = -1  # the item's story index: which sequence its row holds (resample ablation)
    # which head set its row ablates: an index into ablate_head_sets' sets (several draws in
    # one batch, control.draws_per_pass); 0 where one set (or none) is ablated
    head_set: int = 0

    def greedy_reads(self, max_new_tokens: int) -> int:
        """Positions whose argmax is a greedy token that may be known from the pass."""
        return min(max_new_tokens, len(self.teacher) + 1)

    def reads(self, max_new_tokens: int) -> int:
        """Positions read from the pass: the greedy ones and every gold answer token's."""
        return max(self.greedy_reads(max_new_tokens), len(self.answer))


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's special tokens (a prompt's encoding)."""
    return list(tokenizer(text)["input_ids"])


def encode_all(tokenizer, texts: Sequence[str], **kwargs) -> list[list[int]]:
    """One batched tokenizer call (fast tokenizers encode a list in one native call)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), **kwargs)["input_ids"]]


def prompt_tail(prompt: str) -> str:
    """The prompt's last line with the newline before it: the context that decides how an
    answer right after the prompt tokenizes (tokenizers split words at whitespace)."""
    cut = prompt.rfind("\n")
    return prompt[cut:] if cut >= 0 else prompt


def answer_tokens(tokenizer, tails: Sequence[str], answers: Sequence[str]
                  ) -> dict[tuple[str, str], tuple[list[int], int]]:
    """For each (prompt tail, answer): the tokens of the gold continuation ``answer + "\\n"``
    as they follow a prompt ending in that tail, and how many of them cover the answer.

    Tokenized the way :func:`build_rows` tokenizes the gold continuation: after the context
    where its tokens extend the context's, else on its own (:func:`continuation_tokens`). The
    answer's tokens are those of ``context + answer``; where the answer's last token merges
    with the newline they are the continuation's tokens up to that merged one. The context is
    the tail (:func:`prompt_tail`), not the whole prompt, so that a task's few answers tokenize
    once; :func:`build_rows` checks the result against each row (an item whose row disagrees
    gets its own row of exactly these tokens)."""
    pairs = sorted({(t, a) for t in tails for a in answers})
    contexts = sorted({t for t, _ in pairs})
    texts = contexts + [t + a + "\n" for t, a in pairs] + [t + a for t, a in pairs]
    enc = dict(zip(texts, encode_all(tokenizer, texts, add_special_tokens=False)))
    alone = {}
    out: dict[tuple[str, str], tuple[list[int], int]] = {}
    for t, a in pairs:
        head, cont, short = enc[t], enc[t + a + "\n"], enc[t + a]
        if cont[:len(head)] == head and short[:len(head)] == head:
            cont, short = cont[len(head):], short[len(head):]
        else:
            if a not in alone:
                alone[a] = (continuation_tokens(tokenizer, a),
                            encode_all(tokenizer, [a], add_special_tokens=False)[0])
            cont, short = alone[a]
        n = next((i for i, (x, y) in enumerate(zip(cont, short)) if x != y), len(short))
        out[t, a] = cont, min(len(cont), n + (n < len(short)))
    return out


def build_rows(tokenizer, items: Sequence[Item], max_new_tokens: int,
               candidates: Sequence[str] | None = None
               ) -> list[tuple[list[int], list[Query]]]:
    """Token rows to run, each answering one or more items (shared story prefixes).

    Each query reads the greedy positions (prompt end, then each teacher token, up to
    ``max_new_tokens``) and every gold answer token's position, so a row reaches as far as
    the longer of the two. ``candidates``: the answers whose first tokens ``logit_diff``
    compares with the gold's (None: the items' distinct answers)."""
    lead = items[0].lead if items else ""  # the format's, the same for every item
    candidates = sorted({lead + c for c in (candidates if candidates is not None
                                            else {it.answer for it in items})})
    tails = [prompt_tail(it.prompt) for it in items]
    known = answer_tokens(tokenizer, sorted(set(tails)),
                          sorted(set(candidates) | {it.target for it in items}))
    firsts: dict[str, set[int]] = {}
    for t in set(tails):
        firsts[t] = {known[t, c][0][0] for c in candidates if known[t, c][0]}

    def gold(i: int) -> tuple[list[int], list[int], list[int]]:
        """(continuation, answer tokens, other candidates' first tokens) of item i."""
        cont, n = known[tails[i], items[i].target]
        answer = cont[:n]
        others = sorted(firsts[tails[i]] - {answer[0]}) if answer else []
        return cont, answer, others

    by_story: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_story.setdefault(it.story_index, []).append(i)
    groups = [sorted(idxs, key=lambda i: items[i].line) for idxs in by_story.values()]
    lasts = [items[g[-1]] for g in groups]
    last_ids = encode_all(tokenizer, [it.prompt for it in lasts])
    full_ids = encode_all(tokenizer, [it.prompt + it.target + "\n" for it in lasts])
    others_ = [i for g in groups for i in g[:-1]]
    other_ids = dict(zip(others_, encode_all(tokenizer, [items[i].prompt for i in others_])))
    rows: list[tuple[list[int], list[Query]]] = []
    need = max_new_tokens - 1

    def extent(answer: list[int]) -> int:
        return max(need, len(answer) - 1)  # tokens fed after the prompt

    for idxs, last, prompt_ids, full in zip(groups, lasts, last_ids, full_ids):
        cont, answer, others = gold(idxs[-1])
        p = len(prompt_ids)
        if full[:p] != prompt_ids:
            full = prompt_ids + continuation_tokens(tokenizer, last.target)
        if full[p:p + len(answer)] != answer:  # the answer tokenizes otherwise in context
            full = prompt_ids + cont
        row = full[:p + extent(answer)]
        queries = [Query(idxs[-1], p - 1, row[p:], answer, others, last.story_index)]
        for i in idxs[:-1]:
            ids = other_ids[i]
            cont, answer, others = gold(i)
            q = len(ids)
            if row[:q] == ids and row[q:q + len(answer)] == answer:
                queries.append(Query(i, q - 1, row[q:q + extent(answer)], answer, others,
                                     last.story_index))
            else:  # tokenization differs at the boundary: the item gets its own row
                own = ids + cont[:extent(answer)]
                rows.append((own, [Query(i, q - 1, own[q:], answer, others,
                                         last.story_index)]))
        rows.append((row, queries))
    return rows


def continuation_tokens(tokenizer, target: str) -> list[int]:
    """Token ids of the gold continuation ``target + "\\n"`` on its own (no special
    tokens)."""
    return list(tokenizer(target + "\n", add_special_tokens=False)["input_ids"])


MIN_SHARED_PREFIX = 8  # tokens; a shorter common prefix is not worth its own forward pass


def shared_prefix_length(rows) -> int:
    """Tokens every row starts with, stopping before any row's first read position (its
    logits must come out of the pass)."""
    first = rows[0][0]
    n = min(q.pos for _, queries in rows for q in queries)
    for row, _ in rows[1:]:
        n = min(n, len(row))
        n = next((i for i in range(n) if row[i] != first[i]), n)
    return n


def items_in(rows) -> int:
    """How many items (queries) ``rows`` answer (a progress bar's weight of a batch)."""
    return sum(len(queries) for _, queries in rows)

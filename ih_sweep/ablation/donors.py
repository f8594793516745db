"""Resample ablation's donors: which story donates to which, and the donors' head outputs.

Resample ablation (Chan et al. 2022, "Causal Scrubbing",
https://www.alignmentforum.org/posts/JvZhhzycHu2Yd57RN, resampling activations from other
inputs; Heimersheim & Nanda 2024, "How to use and interpret activation patching",
https://arxiv.org/abs/2404.15255, section 2, "resample ablation") replaces a head's output by
its output on another story's text at the matching position: with ``ablation.align=start``
(the default) the same absolute position; with ``end`` the same position counted from the
end of the prompt (:attr:`Donors.shift`), so that at the prompt's last token, the one whose
logits give the answer, the donor sits at its own prompt's last token: the same role in
the prompt (in the notebook's format the same token), and the positions after it are the
donor's own answer slot. Counted from the end of the story's last evaluated prompt, which
every question of a story shares (``eval.scope=all``: earlier questions of the story are
aligned by that offset too). Absolute alignment puts a donor of another length at a
position of another role there (a word of a statement, a question's name): on the tiny
model at N=8, 104 of 200 stories' donors hold the same token at the deciding position.
Each story has one donor
story (:func:`draw_donors`): drawn uniformly, with a generator seeded by (``ablation.seed``,
story index), among the job's other stories whose donor text covers every position the
story's evaluation feeds, so that the alignment rarely runs out; the draw does not depend
on batches, chunks or item order. The donor's outputs come from one clean (unablated)
forward pass over the donor's text (:func:`resample_donors`; the evaluation job uses the
donor story's last evaluated prompt followed by its gold continuation and a newline,
:func:`donor_texts`). Past the donor text's end (only where no other story's text is long
enough), and before its start (``end``, a donor prompt shorter than the story's), the
position-wise mean (:class:`ih_sweep.ablation.means.PositionMeans`). Every question of a
story shares its donor; the draw does not depend on the alignment.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ih_sweep.ablation.hooks import head_columns, heads_by_layer, require_unablated
from ih_sweep.ablation.means import PositionMeans
from ih_sweep.ablation.registry import AblationError
from ih_sweep.model.positions import positions_from_mask
from ih_sweep.model.sites import head_sites, hook_z
from ih_sweep.model.tokens import pad_id


@dataclass
class Donors:
    """Resample ablation's donor outputs for one set of heads (:func:`resample_donors`).

    ``donor_of``: each story (row key) -> its donor story; ``row_of``: donor story -> row
    of ``values``; ``values[layer]``: [donors, longest donor text, the layer's ablated
    heads' columns] in the model's dtype, on its device (zeros past each text's end);
    ``lengths``: [donors] tokens of each donor text; ``heads``: the (layer, head) pairs
    held, in column order per layer; ``fallback``: the position-wise means used past a
    donor text's end."""

    donor_of: dict[int, int]
    row_of: dict[int, int]
    values: dict[int, torch.Tensor]
    lengths: torch.Tensor
    heads: list[tuple[int, int]]
    columns: dict[int, torch.Tensor]  # per layer, the o_proj input columns of ``values``
    fallback: PositionMeans
    seed: int = 0
    past_end: dict[int, int] = field(default_factory=dict)  # see resample_donors
    # per story (row key): donor position minus row position (align=end: the donor's prompt
    # tokens minus the story's; empty: 0 for every story, align=start)
    shift: dict[int, int] = field(default_factory=dict)

    def rows(self, keys: Sequence[Hashable], device) -> torch.Tensor:
        """[len(keys)] rows of :attr:`values` holding each key's donor."""
        try:
            rows = [self.row_of[self.donor_of[k]] for k in keys]
        except KeyError as err:
            raise AblationError(f"resample ablation: no donor was drawn for sequence "
                                f"{err.args[0]!r} (donors exist for the job's "
                                f"{len(self.donor_of)} stories)") from None
        return torch.tensor(rows, dtype=torch.long, device=device)

    def shifts(self, keys: Sequence[Hashable], device) -> torch.Tensor:
        """[len(keys)] each key's :attr:`shift` (0 where none is held)."""
        return torch.tensor([self.shift.get(k, 0) for k in keys], dtype=torch.long,
                            device=device)

    def at(self, layer: int, positions: torch.Tensor, rows: torch.Tensor,
           fallback: torch.Tensor, shifts: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, pos, columns]: each row's donor output at the matching position
        (``positions`` [batch, pos] plus the row's ``shifts`` [batch], :meth:`shifts`; None:
        the same absolute position; ``rows``: :meth:`rows` of the batch), ``fallback``
        [batch, pos, columns] outside the donor's text; on ``fallback``'s device."""
        values = self.values[layer]
        p = positions.to(values.device)
        if shifts is not None:
            p = p + shifts.to(values.device)[:, None]
        got = values[rows[:, None], p.clamp(min=0, max=values.shape[1] - 1)]
        past = (p >= self.lengths.to(values.device)[rows][:, None]) | (p < 0)
        return torch.where(past[..., None], fallback.to(values.device, values.dtype),
                           got).to(fallback.device)

    def covers(self, heads: Sequence[tuple[int, int]]) -> bool:
        """Whether these donors hold every one of ``heads``."""
        held = {(int(la), int(h)) for la, h in self.heads}
        return all((int(la), int(h)) in held for la, h in heads)

    def subset(self, heads: Sequence[tuple[int, int]]) -> Donors:
        """The donors of ``heads`` alone (a subset of :attr:`heads`), equal to what
        :func:`resample_donors` returns for them: the draw does not depend on the heads and
        a head's outputs come from the same clean passes, so only columns are selected
        (the same donor draw, lengths and fallback, shared). Raises :class:`AblationError`
        for a head these donors do not hold."""
        held: dict[int, list[int]] = defaultdict(list)
        for la, h in self.heads:
            held[int(la)].append(int(h))
        wanted: dict[int, list[int]] = defaultdict(list)
        for la, h in heads:
            if int(h) not in held.get(int(la), []):
                raise AblationError(f"resample ablation: head ({la}, {h}) is not among the "
                                    "heads these donor outputs were taken for")
            wanted[int(la)].append(int(h))
        values, columns = {}, {}
        for layer, hs in wanted.items():
            width = len(self.columns[layer]) // len(held[layer])  # head_dim
            pick = torch.cat([torch.arange(held[layer].index(h) * width,
                                           (held[layer].index(h) + 1) * width) for h in hs])
            values[layer] = self.values[layer][..., pick.to(self.values[layer].device)]
            columns[layer] = self.columns[layer][pick]
        return Donors(self.donor_of, self.row_of, values, self.lengths,
                      [(la, h) for la, hs in wanted.items() for h in hs], columns,
                      self.fallback, self.seed, self.past_end, self.shift)


def draw_donors(lengths: Mapping[int, int], seed: int,
                needed: Mapping[int, int] | None = None) -> dict[int, int]:
    """Each story's donor story. ``lengths``: per story (index >= 0), the tokens of the text
    it donates; ``needed``: per story, the positions its own evaluation feeds (none: 0).

    A story's donor is drawn uniformly among the *other* stories whose donor text covers
    every position it feeds (length >= needed), with ``numpy.random.default_rng([seed,
    story])``; where no other story's text is that long, among the other stories with the
    longest text (positions past its end then get the fallback). Each story's draw depends
    only on the seed, the story and the stories' lengths, not on batches, chunks or item
    order. Raises :class:`AblationError` with fewer than 2 stories."""
    keys = sorted(lengths)
    if len(keys) < 2:
        raise AblationError(f"resample ablation needs at least 2 stories to draw donors from "
                            f"(the job has {len(keys)})")
    size = np.array([lengths[k] for k in keys])
    out = {}
    for i, k in enumerate(keys):
        other = np.arange(len(keys)) != i
        ok = other & (size >= (needed or {}).get(k, 0))
        if not ok.any():
            ok = other & (size == size[other].max())
        choices = np.flatnonzero(ok)
        out[k] = keys[int(choices[np.random.default_rng([seed, int(k)]).integers(len(choices))])]
    return out


@torch.no_grad()
def resample_donors(model, tokenizer, texts: Mapping[int, str],
                    heads: Sequence[tuple[int, int]], seed: int, fallback: PositionMeans,
                    needed: Mapping[int, int] | None = None, batch_size: int = 16,
                    prompts: Mapping[int, int] | None = None) -> Donors:
    """Resample ablation's donors: :func:`draw_donors` over the stories of ``texts`` (one
    text per story index: what that story donates, tokenized with special tokens) and
    ``needed`` (per story, the positions its evaluation feeds: prompt tokens plus generated
    ones), then one clean forward pass per batch of donor texts (no ablation may be on;
    right-padded, position ids from the mask, no cache) capturing the ``heads``' outputs at
    every position. ``prompts``: per story, its (last evaluated) prompt's tokens, for
    ``ablation.align=end`` (:attr:`Donors.shift` = the donor's minus the story's; None:
    absolute alignment, ``start``). :attr:`Donors.past_end` counts, per story, the positions
    it feeds that fall outside its donor's text (they get ``fallback``). Memory: the donor
    texts' tokens x len(heads) x head_dim values of the model's dtype, on its device."""
    require_unablated(model, "resample donors")
    sites = head_sites(model)
    by_layer = heads_by_layer(sites, heads)
    cols = {layer: head_columns(sites, hs) for layer, hs in by_layer.items()}
    stories = sorted(texts)
    tokens = dict(zip(stories, (list(ids) for ids in tokenizer([texts[k] for k in stories])
                                ["input_ids"])))
    donor_of = draw_donors({k: len(t) for k, t in tokens.items()}, seed, needed)
    keys = sorted(set(donor_of.values()))
    encoded = [tokens[k] for k in keys]
    longest = max(len(e) for e in encoded)
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    values: dict[int, torch.Tensor] = {}
    current: list[slice] = []

    def keep(layer: int, z: torch.Tensor) -> None:
        if layer not in values:
            values[layer] = z.new_zeros(len(keys), longest, len(cols[layer]))
        part = z[..., cols[layer].to(z.device)]
        values[layer][current[0], :part.shape[1]] = part

    with hook_z(sites, keep, by_layer):
        for start in range(0, len(keys), batch_size):
            chunk = encoded[start:start + batch_size]
            width = max(len(e) for e in chunk)
            ids = torch.tensor([e + [pad] * (width - len(e)) for e in chunk])
            mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in chunk])
            current[:] = [slice(start, start + len(chunk))]
            model(input_ids=ids.to(device), attention_mask=mask.to(device),
                  position_ids=positions_from_mask(mask).to(device), use_cache=False,
                  logits_to_keep=1)  # only the heads' outputs are read
    lengths = torch.tensor([len(e) for e in encoded])
    for layer, v in values.items():  # pads' outputs are never read: zero them for clarity
        valid = torch.arange(longest, device=v.device)[None, :] < lengths.to(v.device)[:, None]
        values[layer] = torch.where(valid[..., None], v, 0)
    row_of = {k: i for i, k in enumerate(keys)}
    shift = {k: int(prompts[d]) - int(prompts[k]) for k, d in donor_of.items()} \
        if prompts is not None else {}
    past_end = {}
    for k, n in (needed or {}).items():
        if k in donor_of:
            s = shift.get(k, 0)
            past_end[k] = max(0, int(n) + s - int(lengths[row_of[donor_of[k]]])) + max(0, -s)
    return Donors(donor_of, row_of, values, lengths,
                  [(la, h) for la, hs in by_layer.items() for h in hs], cols, fallback, seed,
                  past_end, shift)


def donor_texts(tokenizer, items: Sequence, max_new_tokens: int
                ) -> tuple[dict[int, str], dict[int, int]]:
    """Per story of ``items``: the text it donates in resample ablation (its last evaluated
    question's prompt followed by its gold continuation and a newline, as the evaluator
    feeds it), and the positions its own evaluation feeds (its longest prompt's tokens plus
    ``max_new_tokens - 1`` generated ones; :func:`prompt_lengths` = that less
    ``max_new_tokens - 1``)."""
    last: dict[int, Any] = {}
    for it in items:
        if it.story_index not in last or it.line > last[it.story_index].line:
            last[it.story_index] = it
    texts = {k: it.prompt + it.target + "\n" for k, it in last.items()}
    lengths = tokenizer([it.prompt for it in last.values()])["input_ids"]
    needed = {k: len(ids) + max_new_tokens - 1 for k, ids in zip(last, lengths)}
    return texts, needed


def prompt_lengths(needed: Mapping[int, int], max_new_tokens: int) -> dict[int, int]:
    """Per story, its last evaluated prompt's tokens, from :func:`donor_texts`' ``needed``
    (resample's ``ablation.align=end`` counts positions from there)."""
    return {k: int(n) - (max_new_tokens - 1) for k, n in needed.items()}


def donor_bytes_per_head(model, tokenizer, texts: Mapping[int, str]) -> int:
    """Bytes resample's donor outputs take per head: donor texts x the longest one's tokens
    x head_dim x the bytes of an activation (:func:`ih_sweep.model.batching.compute_dtype_bytes`:
    the dtype head outputs are stored in, float32 for an nf4 model with float32 embeddings
    although its matmuls round in bfloat16) (:func:`resample_donors`)."""
    from ih_sweep.model.batching import compute_dtype_bytes

    longest = max((len(ids) for ids in tokenizer(list(texts.values()))["input_ids"]),
                  default=0)
    return len(texts) * longest * head_sites(model).head_dim * compute_dtype_bytes(model)

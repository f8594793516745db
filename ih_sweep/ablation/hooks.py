"""Head ablation at the right place: the head's slice of the attention output projection's
input (o_proj / c_proj / dense / out_proj; TransformerLens's ``hook_z``, see
:func:`ih_sweep.model.architecture.hook_z`).

The notebook hooked ``post_attention_layernorm``'s output (the MLP input), which is not a head.
Hooks always come off, also when the body raises.

What replaces an ablated head's output ``z`` (``ablation.method``), at every token of every
forward pass while :func:`ablate_heads` is on:

- ``zero``: 0 (zero ablation; the head's bias-free contribution to the residual stream
  vanishes).
- ``mean``: the head's mean output over every real token of the reference prompts
  (:func:`head_means`; mean ablation, e.g. Wang et al. 2022, "Interpretability in the Wild",
  https://arxiv.org/abs/2211.00593, section 3.1, over a reference distribution).
- ``position_mean``: the head's mean output at the token's absolute position over the
  reference prompts that reach that position (:func:`position_means`); past the longest
  reference, the overall mean (``mean``'s value). Position-wise mean ablation keeps what
  the head writes at every position on average, so positional information the head carries
  is not removed with the ablation (Heimersheim & Nanda 2024, "How to use and interpret
  activation patching", https://arxiv.org/abs/2404.15255, section on ablation choices:
  "mean over a reference distribution", taken per position when prompts are aligned).
- ``resample``: the head's output on another story's text at the same absolute position:
  resample ablation (Chan et al. 2022, "Causal Scrubbing",
  https://www.alignmentforum.org/posts/JvZhhzycHu2Yd57RN, resampling activations from
  other inputs; Heimersheim & Nanda 2024, section 2, "resample ablation"). Each story has
  one donor story (:func:`draw_donors`): drawn uniformly, with a generator seeded by
  (``ablation.seed``, story index), among the job's other stories whose donor text covers
  every position the story's evaluation feeds, so that the alignment rarely runs out; the
  draw does not depend on batches, chunks or item order. The donor's outputs come from one
  clean (unablated) forward pass over the donor's text (:func:`resample_donors`; the
  evaluation job uses the donor story's last evaluated prompt followed by its gold
  continuation and a newline). Positions are aligned absolutely: the token at position p
  (its index among its row's real tokens, BOS = 0) gets the donor text's output at p; past
  the donor text's end (only where no other story's text is long enough), the
  position-wise mean at p (``position_mean``'s value, with its own fallback). Every
  question of a story shares its donor.

Absolute positions come from the model-level hook of
:func:`ih_sweep.model.architecture.track_positions` (attention mask, position ids, cache length
of each forward call); which story each batch row holds comes from the caller
(:func:`sequence_keys`). Where either is unknown the hook raises instead of guessing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ih_sweep.config.errors import UserError
from ih_sweep.config.schema import AblationMethod
from ih_sweep.model.architecture import HeadSites, head_sites, hook_z, positions_from_mask
from ih_sweep.model.forward import ForwardContext
from ih_sweep.model.positions import current_positions, track_positions
from ih_sweep.model.tokens import pad_id


class AblationError(UserError):
    """Heads or an ablation method the model cannot take."""

    kind = "config"


def _columns(sites: HeadSites, heads: Sequence[int]) -> torch.Tensor:
    return torch.cat([torch.arange(h * sites.head_dim, (h + 1) * sites.head_dim)
                      for h in heads])


def _validate(sites: HeadSites, heads: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in heads:
        if not (0 <= layer < sites.n_layers and 0 <= head < sites.heads_per_layer):
            raise AblationError(f"head ({layer}, {head}) is outside the model's "
                                f"{sites.n_layers} layers x {sites.heads_per_layer} heads")
        by_layer[int(layer)].append(int(head))
    return by_layer


# --------------------------------------------------------------------------- fills
@dataclass
class PositionMeans:
    """The position-wise mean of every layer's o_proj input over reference prompts.

    ``table[layer]``: [P + 1, heads_per_layer * head_dim] float32 (CPU); row p < P is the
    mean over the references with more than p real tokens (at least one: P is the longest
    reference's length), row P the mean over every reference token. ``counts``: [P]
    references reaching each position."""

    table: dict[int, torch.Tensor]
    counts: torch.Tensor

    @property
    def n_positions(self) -> int:
        return int(self.counts.numel())

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Row of :attr:`table` for each absolute position: itself, or P past the longest
        reference."""
        return positions.clamp(min=0, max=self.n_positions)


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

    def rows(self, keys: Sequence[Hashable], device) -> torch.Tensor:
        """[len(keys)] rows of :attr:`values` holding each key's donor."""
        try:
            rows = [self.row_of[self.donor_of[k]] for k in keys]
        except KeyError as err:
            raise AblationError(f"resample ablation: no donor was drawn for sequence "
                                f"{err.args[0]!r} (donors exist for the job's "
                                f"{len(self.donor_of)} stories)") from None
        return torch.tensor(rows, dtype=torch.long, device=device)

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
                      self.fallback, self.seed, self.past_end)


# --------------------------------------------------------------------------- row identity
# (the state lives in the model's ForwardContext, ih_sweep.model.forward)
@contextmanager
def sequence_keys(model, keys: Sequence[Hashable]) -> Iterator[None]:
    """Inside (this thread), the forward passes of ``model`` hold these sequences in their
    batch rows, one key per row (the evaluator gives each row's story index). Resample
    ablation takes each row's donor from it; other methods ignore it."""
    with ForwardContext.of(model).sequence_keys(keys):
        yield


def row_dependent(model) -> bool:
    """Whether an ablation on ``model`` fills a row by which sequence it holds (resample):
    then a prefix that all rows share must still run in every row."""
    return ForwardContext.of(model).row_dependent


def _refuse_if_ablated(model, what: str) -> None:
    if ForwardContext.of(model).ablating:
        raise AblationError(f"{what} must come from the unablated model: compute them "
                            "before ablate_heads")


def _current_rows(donors: Donors, batch: int, device, ctx: ForwardContext) -> torch.Tensor:
    keys = ctx.row_keys
    if keys is None:
        raise AblationError("resample ablation: a forward pass did not say which sequence "
                            "each batch row holds (ih_sweep.ablation.hooks.sequence_keys), so no "
                            "donor can be chosen")
    if len(keys.keys) != batch:
        raise AblationError(f"resample ablation: the pass has {batch} rows but "
                            f"{len(keys.keys)} sequence keys were given")
    rows = keys.cache.get((id(donors), device))
    if rows is None:
        rows = keys.cache[(id(donors), device)] = donors.rows(keys.keys, device)
    return rows


# --------------------------------------------------------------------------- the hook
@contextmanager
def ablate_heads(model, heads: Sequence[tuple[int, int]],
                 method: AblationMethod | str = AblationMethod.zero,
                 means: dict[int, torch.Tensor] | PositionMeans | Donors | None = None
                 ) -> Iterator[None]:
    """Replace the listed (layer, query head) outputs while inside, by ``method`` (see the
    module docstring). ``means``: what the method fills in: ``mean``: ``{layer:
    [heads_per_layer * head_dim]}`` (:func:`head_means`); ``position_mean``:
    :class:`PositionMeans` (:func:`position_means`); ``resample``: :class:`Donors` for
    exactly these heads (:func:`resample_donors`).

    ``position_mean`` and ``resample`` read each token's absolute position from the forward
    call of ``model`` (:func:`ih_sweep.model.architecture.track_positions`); ``resample`` also
    needs the passes' row keys (:func:`sequence_keys`). Raises :class:`AblationError` for
    heads outside the model, an unknown method or a missing/mismatched ``means``."""
    allowed = [m.value for m in AblationMethod]
    if method not in allowed:
        raise AblationError(f"ablation.method={method!r}; allowed values: {', '.join(allowed)}")
    method = AblationMethod(method)
    if method == AblationMethod.mean and means is None:
        raise AblationError("ablation.method=mean needs head means (head_means())")
    if method == AblationMethod.position_mean and not isinstance(means, PositionMeans):
        raise AblationError("ablation.method=position_mean needs position-wise means "
                            "(position_means())")
    if method == AblationMethod.resample:
        if not isinstance(means, Donors):
            raise AblationError("ablation.method=resample needs donor outputs "
                                "(resample_donors())")
        if sorted(map(tuple, means.heads)) != sorted((int(la), int(h)) for la, h in heads):
            raise AblationError("resample ablation: the donor outputs were taken for other "
                                "heads than those ablated")
    sites = head_sites(model)
    by_layer = _validate(sites, heads)
    # resample: the same heads (checked), in the donors' column order
    cols = means.columns if method == AblationMethod.resample else \
        {layer: _columns(sites, layer_heads) for layer, layer_heads in by_layer.items()}
    ctx = ForwardContext.of(model)
    replace = _filler(method, means, cols, ctx)
    with ExitStack() as stack:
        if by_layer:
            stack.enter_context(ctx.counted("ablating"))
        if by_layer and method in (AblationMethod.position_mean, AblationMethod.resample):
            stack.enter_context(track_positions(model, ctx))
        if by_layer and method == AblationMethod.resample:
            stack.enter_context(ctx.counted("row_dependent_ablations"))
        stack.enter_context(hook_z(sites, replace, by_layer))
        yield


def _filler(method: AblationMethod, means, cols: dict[int, torch.Tensor],
            ctx: ForwardContext):
    """The hook_z function of ``method``: z [batch, pos, width] -> z with the ablated
    heads' columns replaced."""
    on_device: dict = {}

    def table(layer: int, device) -> torch.Tensor:
        """position_mean's [P + 1, columns] of the layer on ``device`` (float32)."""
        key = (layer, device)
        if key not in on_device:
            tab = means if isinstance(means, PositionMeans) else means.fallback
            on_device[key] = tab.table[layer][:, cols[layer]].to(device)
        return on_device[key]

    def replace(layer: int, z: torch.Tensor) -> torch.Tensor:
        x = z.clone()
        c = cols[layer].to(x.device)
        if method == AblationMethod.zero:
            x[..., c] = 0
        elif method == AblationMethod.mean:
            x[..., c] = means[layer][cols[layer]].to(device=x.device, dtype=x.dtype)
        else:
            pos = current_positions(z, ctx)  # [batch, pos]
            tab = means if method == AblationMethod.position_mean else means.fallback
            fill = table(layer, x.device)[tab.rows(pos)].to(x.dtype)
            if method == AblationMethod.resample:
                fill = _resampled(means, layer, pos, fill, ctx)
            x[..., c] = fill
        return x

    return replace


def _resampled(donors: Donors, layer: int, pos: torch.Tensor, fallback: torch.Tensor,
               ctx: ForwardContext) -> torch.Tensor:
    """[batch, pos, columns]: each row's donor output at the same absolute position, the
    ``fallback`` past the donor text's end."""
    values = donors.values[layer]
    rows = _current_rows(donors, pos.shape[0], values.device, ctx)
    p = pos.to(values.device)
    got = values[rows[:, None], p.clamp(min=0, max=values.shape[1] - 1)]
    past = p >= donors.lengths.to(values.device)[rows][:, None]
    return torch.where(past[..., None], fallback.to(values.device, values.dtype),
                       got).to(fallback.device)


# --------------------------------------------------------------------------- references
@torch.no_grad()
def head_means(model, batches: Sequence[dict[str, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Each layer's mean o_proj input [heads_per_layer * head_dim] over the real (non-pad)
    tokens of reference batches (``input_ids``, ``attention_mask``; padded on either side).

    Each pass gets position ids derived from the mask (:func:`positions_from_mask`), so the
    means do not depend on the batch size or the tokenizer's padding side (left padding
    without them shifts GPT-2's and other absolute-position models' positions)."""
    sites = head_sites(model)
    sums = [None] * sites.n_layers
    count = 0
    current_mask: list[torch.Tensor] = []

    def add(i: int, z: torch.Tensor) -> None:
        x = z.float()
        m = current_mask[0].to(x.device).bool()[..., None]
        s = torch.where(m, x, 0.0).sum((0, 1)).cpu()  # pads may hold NaN (no key to attend)
        sums[i] = s if sums[i] is None else sums[i] + s

    with hook_z(sites, add):
        for batch in batches:
            mask = batch["attention_mask"]
            current_mask[:] = [mask]
            model(**batch, position_ids=positions_from_mask(mask), use_cache=False,
                  logits_to_keep=1)  # the hooks read z; no logits are needed
            count += int(mask.sum())
    if count == 0:
        raise AblationError("mean ablation needs at least one reference token")
    return {i: s / count for i, s in enumerate(sums)}


@torch.no_grad()
def position_means(model, batches: Sequence[dict[str, torch.Tensor]]) -> PositionMeans:
    """Each layer's mean o_proj input at each absolute position over the real tokens of
    reference batches (as for :func:`head_means`), and over all of them: a
    :class:`PositionMeans`. A token's position is its index among its row's real tokens
    (:func:`positions_from_mask`), so the means do not depend on batching or padding
    side. Raises :class:`AblationError` without any reference token."""
    _refuse_if_ablated(model, "position-wise means")
    sites = head_sites(model)
    sums: list[torch.Tensor | None] = [None] * sites.n_layers
    counts = torch.zeros(0, dtype=torch.long)
    current: list = []  # this batch's (mask, positions of its real tokens on the host, n)

    def grow(t: torch.Tensor | None, n: int, width: int) -> torch.Tensor:
        out = torch.zeros(n, width, dtype=torch.float64)
        if t is not None:
            out[:t.shape[0]] = t
        return out

    def add(i: int, z: torch.Tensor) -> None:
        mask, p, n = current
        x = z[mask.to(z.device).bool()].double().cpu()  # [real tokens, width]; pads: NaN
        s = sums[i]
        if s is None or s.shape[0] < n:
            s = grow(s, n, x.shape[-1])
        sums[i] = s.index_add_(0, p, x)

    with hook_z(sites, add):
        for batch in batches:
            mask = batch["attention_mask"]
            pos = positions_from_mask(mask)
            p = pos[mask.bool()].cpu()  # once per batch, not once per layer
            n = int(p.max()) + 1 if p.numel() else 0
            current[:] = [mask, p, n]
            model(**batch, position_ids=pos, use_cache=False, logits_to_keep=1)
            c = torch.bincount(p, minlength=n)
            if c.numel() > counts.numel():
                c[:counts.numel()] += counts
                counts = c
            else:
                counts[:c.numel()] += c
    total = int(counts.sum())
    if total == 0:
        raise AblationError("position-wise mean ablation needs at least one reference token")
    table = {}
    for i, s in enumerate(sums):
        per_position = s[:counts.numel()] / counts[:, None].double()
        overall = s.sum(0, keepdim=True) / total
        table[i] = torch.cat([per_position, overall]).float()
    return PositionMeans(table, counts)


# --------------------------------------------------------------------------- donors
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
                    needed: Mapping[int, int] | None = None, batch_size: int = 16
                    ) -> Donors:
    """Resample ablation's donors: :func:`draw_donors` over the stories of ``texts`` (one
    text per story index: what that story donates, tokenized with special tokens) and
    ``needed`` (per story, the positions its evaluation feeds: prompt tokens plus generated
    ones), then one clean forward pass per batch of donor texts (no ablation may be on;
    right-padded, position ids from the mask, no cache) capturing the ``heads``' outputs at
    every position. :attr:`Donors.past_end` counts, per story, the positions past its donor
    text's end (they get ``fallback``). Memory: the donor texts' tokens x len(heads) x
    head_dim values of the model's dtype, on its device."""
    _refuse_if_ablated(model, "resample donors")
    sites = head_sites(model)
    by_layer = _validate(sites, heads)
    cols = {layer: _columns(sites, hs) for layer, hs in by_layer.items()}
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
    past_end = {}
    for k, n in (needed or {}).items():
        if k in donor_of:
            past_end[k] = max(0, int(n) - int(lengths[row_of[donor_of[k]]]))
    return Donors(donor_of, row_of, values, lengths,
                  [(la, h) for la, hs in by_layer.items() for h in hs], cols, fallback, seed,
                  past_end)

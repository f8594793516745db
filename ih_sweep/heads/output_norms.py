"""How much each head writes: its mean output norm ||z_h W_O^h|| over reference prompts.

A head's write into the residual stream at one token is ``z_h W_O^h``: ``z_h`` [head_dim] is
its slice of the attention output projection's input (o_proj / c_proj / dense / out_proj,
TransformerLens's ``hook_z``: where ablation acts, :func:`ih_sweep.model.sites.hook_z`),
``W_O^h`` [head_dim, d_model] that projection's weight columns for the head
(:meth:`ih_sweep.model.sites.HeadSites.w_o`); the projection's bias is shared by all heads
and belongs to none. Its L2 norm is in the residual stream's own units (those of the
model's hidden states). Elhage et al. 2021 ("A Mathematical Framework for Transformer
Circuits", section "Attention heads are independent and additive") write the attention
layer's output as this sum of per-head terms.

Why it is recorded: ablating heads that write little can hurt little whatever they do, so a
control compared with the induction heads should write about as much (issue #30 item 1; on
the tiny model the layer-matched ``low`` control of N=8 writes 1.49 against the top-8's
8.08). heads.csv's ``output_norm`` and job.json's ``output_norm_mean`` show it;
``control.match=layer_norm`` draws a random control matched on it
(:func:`ih_sweep.heads.selection.norm_matched`).

The reference prompts are mean ablation's (:func:`ih_sweep.ablation.means.reference_batches`:
the first ``ablation.n_reference`` of the job's prompts), so the table depends on the model
and the job's prompts only; it is cached per model and prompts like the score tables
(``<paths.cache_dir>/norms/``, :func:`get_output_norms`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ih_sweep.config.errors import UserError
from ih_sweep.config.plain import plain
from ih_sweep.config.schema import Config

log = logging.getLogger(__name__)

NORM_COLUMNS = ["layer", "head", "output_norm"]


class NormError(UserError):
    """No reference token to take the output norms over."""

    kind = "config"


@torch.no_grad()
def head_output_norms(model, batches: Sequence[dict[str, torch.Tensor]]) -> np.ndarray:
    """[layers, heads_per_layer] float64: each query head's mean over the real (non-pad)
    tokens of ``batches`` of ||z_h W_O^h||_2 (residual-stream units; see the module
    docstring), in one no-grad pass of the unablated model.

    ``batches``: dicts of ``input_ids`` and ``attention_mask`` [batch, pos] (padded on
    either side; each pass gets position ids from the mask, as mean ablation's references,
    so batching and padding side do not change the result). Computed per token as
    sqrt(z_h G_h z_h^T) with G_h = W_O^h W_O^h^T [head_dim, head_dim], in float64: no
    [tokens, heads, d_model] tensor is made. Raises :class:`NormError` without any real
    token, :class:`ih_sweep.ablation.registry.AblationError` inside ``ablate_heads`` (the
    norms are the unablated model's)."""
    from ih_sweep.ablation.hooks import require_unablated
    from ih_sweep.model.positions import positions_from_mask
    from ih_sweep.model.sites import head_sites, hook_z

    require_unablated(model, "output norms")
    sites = head_sites(model)
    n_heads, dim = sites.heads_per_layer, sites.head_dim
    grams: dict[int, torch.Tensor] = {}
    sums = np.zeros((sites.n_layers, n_heads))
    count = 0
    current: list[torch.Tensor] = []  # this batch's attention mask

    def add(layer: int, z: torch.Tensor) -> None:
        if layer not in grams:
            w = sites.w_o(layer).to(z.device, torch.float64)  # [heads, head_dim, d_model]
            grams[layer] = torch.einsum("hdm,hem->hde", w, w)
        x = z[current[0].to(z.device).bool()].double().reshape(-1, n_heads, dim)
        x = x.transpose(0, 1)  # [heads, tokens, head_dim]
        squared = (torch.bmm(x, grams[layer]) * x).sum(-1)  # [heads, tokens]: z G z^T
        sums[layer] += squared.clamp(min=0).sqrt().sum(1).cpu().numpy()

    with hook_z(sites, add):
        for batch in batches:
            mask = batch["attention_mask"]
            current[:] = [mask]
            model(**batch, position_ids=positions_from_mask(mask), use_cache=False,
                  logits_to_keep=1)  # the hooks read z; no logits are needed
            count += int(mask.sum())
    if count == 0:
        raise NormError("output norms need at least one reference token (ablation.n_reference "
                        "and the job's prompts)")
    return sums / count


def norm_table(norms: np.ndarray) -> pd.DataFrame:
    """``norms`` [layers, heads] as rows of :data:`NORM_COLUMNS`, layer-major."""
    layers, heads = np.indices(norms.shape)
    return pd.DataFrame({"layer": layers.ravel(), "head": heads.ravel(),
                         "output_norm": norms.ravel()})[NORM_COLUMNS]


def norms_cache_key(config: Config) -> dict[str, Any]:
    """What determines the output-norm table: the model (as the score tables',
    :func:`ih_sweep.heads.score_table.model_key`), what makes the job's prompts (``data``,
    the bAbI files' content, ``eval``'s format, scope, n_shots, demo_seed) and
    ``ablation.n_reference``."""
    from ih_sweep.fingerprints import data_inputs
    from ih_sweep.heads.score_table import model_key

    ev = plain(config.eval)
    files = data_inputs(config)
    return {**model_key(config), "data": plain(config.data),
            "eval": {k: ev[k] for k in ("format", "scope", "n_shots", "demo_seed")},
            "n_reference": config.ablation.n_reference, **({"data_files": files} if files else {})}


def norms_cache_path(config: Config) -> Path:
    """``<paths.cache_dir>/norms/<model>-<12 hex digits of the key's sha256>.csv``."""
    from ih_sweep.model.loading import model_slug

    digest = hashlib.sha256(json.dumps(norms_cache_key(config), sort_keys=True).encode())
    slug = model_slug(config.model, config.quantization)
    return Path(config.paths.cache_dir) / "norms" / f"{slug}-{digest.hexdigest()[:12]}.csv"


def get_output_norms(config: Config, model_getter: Callable[[], tuple[Any, Any]],
                     items: Sequence[Any], shape: tuple[int, int]) -> np.ndarray:
    """[layers, heads] mean output norms (:func:`head_output_norms`) over the first
    ``ablation.n_reference`` of ``items`` (the job's prompts; all where it has fewer),
    from the cache (:func:`norms_cache_path`; checked and written as the score tables are,
    :func:`ih_sweep.heads.score_table.cached_table`) or computed with ``model_getter()``'s
    (model, tokenizer). ``shape``: the model's (layers, heads per layer). Values are read
    back from the written file, so a computed and a cached table give the same floats."""
    from ih_sweep.heads.score_table import cached_table

    def compute() -> pd.DataFrame:
        from ih_sweep.ablation.means import reference_batches

        model, tokenizer = model_getter()
        t0 = time.time()
        n = min(config.ablation.n_reference, len(items))
        norms = head_output_norms(model, reference_batches(tokenizer, items[:n], n, model))
        log.info("output norms of %d heads over %d reference prompts in %.2f s", norms.size,
                 n, time.time() - t0)
        return norm_table(norms)

    path = norms_cache_path(config)
    cached_table(config, path, shape, NORM_COLUMNS, ["output_norm"], compute, None,
                 what="output norms")
    df = pd.read_csv(path)
    out = np.full(shape, np.nan)
    out[df["layer"].to_numpy(), df["head"].to_numpy()] = df["output_norm"].to_numpy()
    return out

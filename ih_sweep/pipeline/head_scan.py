"""Per-head ablation scan: each head's own effect against its induction score.

Exact scan: for a head in layer l the hidden states entering layer l do not change, so they
are computed once per batch and only layers >= l are rerun, with several heads of a layer
ablated side by side (one batch replica per head). Attribution patching estimates every
head's zero-ablation effect from one forward and one backward pass (-grad . z at the o_proj
input), so 7B models can be screened before the exact scan.

Effects per head, all "ablated minus unablated":
- ``d_accuracy``: change in first-token greedy accuracy on the bAbI items (the answer words
  are single tokens for the tiny model; for BPE models this is the first answer token);
- ``d_logprob``: change in the mean log-probability of the first answer token;
- ``d_repeat_loss``: change in the loss on the second repeat of random repeated sequences.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ih_sweep.data import Item
from ih_sweep.heads.scoring import candidate_token_ids, random_sequences
from ih_sweep.model.architecture import HeadSites, head_sites, hook_z, positions_from_mask

log = logging.getLogger(__name__)


@dataclass
class Probe:
    """A batch of token rows (right-padded) with the positions whose next token is scored.
    Every pass over it gives explicit mask-derived position ids
    (:func:`~ih_sweep.model.architecture.positions_from_mask`), so a row's results do not depend on
    the rows beside it."""

    ids: torch.Tensor  # [b, T]
    mask: torch.Tensor  # [b, T]
    pos: torch.Tensor  # [b, K] positions (predicting the token at pos + 1)
    target: torch.Tensor  # [b, K] target token ids
    valid: torch.Tensor  # [b, K] bool


def babi_probe(tokenizer, items: Sequence[Item]) -> Probe:
    """Each item's prompt + first answer token; scored at the prompt's last position."""
    rows, pos, tgt = [], [], []
    for it in items:
        p = list(tokenizer(it.prompt)["input_ids"])
        full = list(tokenizer(it.prompt + it.answer)["input_ids"])
        first = full[len(p)] if full[:len(p)] == p and len(full) > len(p) else \
            tokenizer(it.answer, add_special_tokens=False)["input_ids"][0]
        rows.append(p + [first])
        pos.append([len(p) - 1])
        tgt.append([first])
    return _probe(rows, pos, tgt, tokenizer.pad_token_id or 0)


def repeat_probe(tokenizer, n: int = 16, length: int = 25, seed: int = 0) -> Probe:
    """[BOS] + R + R; scored on every prediction of the second repeat."""
    seqs, _ = random_sequences(n, length, 2, candidate_token_ids(tokenizer),
                               tokenizer.bos_token_id, seed)
    off = 1 if tokenizer.bos_token_id is not None else 0
    rows = seqs.tolist()
    pos = [list(range(off + length - 1, off + 2 * length - 1)) for _ in rows]
    tgt = [r[off + length:off + 2 * length] for r in rows]
    return _probe(rows, pos, tgt, 0)


def _probe(rows, pos, tgt, pad: int) -> Probe:
    width = max(len(r) for r in rows)
    k = max(len(p) for p in pos)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    P = torch.zeros((len(rows), k), dtype=torch.long)
    Y = torch.zeros_like(P)
    V = torch.zeros_like(P, dtype=torch.bool)
    for b, (r, p, t) in enumerate(zip(rows, pos, tgt)):
        ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(r)] = 1
        P[b, :len(p)] = torch.tensor(p)
        Y[b, :len(t)] = torch.tensor(t)
        V[b, :len(p)] = True
    return Probe(ids, mask, P, Y, V)


def probe_readout(logits: torch.Tensor, probe: Probe, reps: int = 1):
    """(log-prob of each probe target [reps, b, K] in nats, whether it is the argmax
    [reps, b, K] bool) from the logits gathered at the probe's K read positions
    [reps * b, K, vocab]; ``reps`` replicas of the probe's b rows are stacked first."""
    logp = torch.log_softmax(logits.float(), -1)
    tgt = probe.target.to(logits.device).repeat(reps, 1)
    lp = logp.gather(-1, tgt[..., None])[..., 0]
    hit = logp.argmax(-1) == tgt
    b = probe.ids.shape[0]
    return lp.reshape(reps, b, -1), hit.reshape(reps, b, -1)


class _Tail:
    """Runs the model from layer l onward with per-replica head masks."""

    def __init__(self, model, sites: HeadSites):
        self.model = model
        self.sites = sites
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def capture(self, probe: Probe):
        """Inputs (args, kwargs) of every decoder layer, and the clean readout."""
        store: dict[int, tuple] = {}
        # the decoder layers' own inputs (hidden states, mask, rotary cos/sin), not hook_z
        handles = [layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: store.__setitem__(i, (a, kw)), with_kwargs=True)
            for i, layer in enumerate(self.sites.layers)]
        try:
            logits = self._logits_at(probe, self.model(
                input_ids=probe.ids.to(self.device),
                attention_mask=probe.mask.to(self.device),
                position_ids=positions_from_mask(probe.mask).to(self.device), use_cache=False,
                output_hidden_states=False).logits)
        finally:
            for h in handles:
                h.remove()
        return store, logits

    def _logits_at(self, probe: Probe, logits: torch.Tensor, reps: int = 1) -> torch.Tensor:
        pos = probe.pos.to(logits.device).repeat(reps, 1)
        return torch.gather(logits, 1, pos[..., None].expand(-1, -1, logits.shape[-1]))

    @torch.no_grad()
    def run_from(self, layer: int, store, probe: Probe, heads: Sequence[int]) -> torch.Tensor:
        """Logits at the probe positions with each head of ``heads`` zeroed in its own replica:
        [len(heads) * b, K, V]."""
        reps = len(heads)
        args, kwargs = store[layer]
        hidden = args[0] if args else kwargs["hidden_states"]
        b = hidden.shape[0]
        hidden = hidden.repeat(reps, 1, 1)
        kw = {k: _repeat(v, reps, b) for k, v in kwargs.items() if k != "hidden_states"}
        hd = self.sites.head_dim
        mask = torch.ones(reps, self.sites.heads_per_layer * hd, device=hidden.device,
                          dtype=hidden.dtype)
        for r, h in enumerate(heads):
            mask[r, h * hd:(h + 1) * hd] = 0
        mask = mask.repeat_interleave(b, 0)[:, None, :]
        x = hidden
        with hook_z(self.sites, lambda _, z: z * mask, [layer]):
            for i in range(layer, self.sites.n_layers):
                out = self.sites.layers[i](x, **kw)
                x = out[0] if isinstance(out, tuple) else out
        pos = probe.pos.to(x.device).repeat(reps, 1)
        x = torch.gather(x, 1, pos[..., None].expand(-1, -1, x.shape[-1]))
        return self.sites.logits(x)  # final norm, project_out, unembedding, softcap


def _repeat(v, reps: int, b: int):
    """Repeat batch-dimension tensors (masks, rotary cos/sin) for the head replicas."""
    if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b and b > 0:
        return v.repeat(reps, *([1] * (v.dim() - 1)))
    if isinstance(v, tuple):
        return tuple(_repeat(x, reps, b) for x in v)
    return v


def exact_scan(model, probes: dict[str, Probe], layers: Sequence[int] | None = None,
               heads_per_pass: int = 8) -> pd.DataFrame:
    """Every head's single-ablation effects, rerunning only the layers from its own on."""
    sites = head_sites(model)
    tail = _Tail(model, sites)
    layers = list(range(sites.n_layers)) if layers is None else list(layers)
    rows = {(la, h): {"layer": la, "head": h} for la in layers
            for h in range(sites.heads_per_layer)}
    for name, probe in probes.items():
        store, clean_logits = tail.capture(probe)
        c_lp, c_hit = probe_readout(clean_logits, probe)
        valid = probe.valid.to(c_lp.device)
        base_lp = (c_lp[0] * valid).sum() / valid.sum()
        base_hit = (c_hit[0] & valid).sum() / valid.sum()
        for la in layers:
            for start in range(0, sites.heads_per_layer, heads_per_pass):
                hs = list(range(start, min(start + heads_per_pass, sites.heads_per_layer)))
                lg = tail.run_from(la, store, probe, hs)
                lp, hit = probe_readout(lg, probe, len(hs))
                for r, h in enumerate(hs):
                    mlp = (lp[r] * valid).sum() / valid.sum()
                    acc = (hit[r] & valid).sum() / valid.sum()
                    if name == "babi":
                        rows[(la, h)]["d_accuracy"] = float(acc - base_hit)
                        rows[(la, h)]["d_logprob"] = float(mlp - base_lp)
                    else:
                        rows[(la, h)]["d_repeat_loss"] = float(base_lp - mlp)
    return pd.DataFrame(list(rows.values()))


def attribution_scan(model, probe: Probe, layers: Sequence[int] | None = None
                     ) -> pd.DataFrame:
    """First-order estimate of each head's zero-ablation effect on the probe's mean target
    log-prob: d ~= -grad(z_h) . z_h at the o_proj input, from one forward and one backward."""
    sites = head_sites(model)
    layers = list(range(sites.n_layers)) if layers is None else list(layers)
    device = next(model.parameters()).device
    acts: dict[int, torch.Tensor] = {}

    def keep(i: int, z: torch.Tensor) -> None:
        z.retain_grad()
        acts[i] = z

    # gradients flow from the embedding output on: no parameter gradients are allocated
    handle = model.get_input_embeddings().register_forward_hook(
        lambda m, a, out: out.requires_grad_(True))
    try:
        with hook_z(sites, keep, layers), torch.enable_grad():
            logits = model(input_ids=probe.ids.to(device),
                           attention_mask=probe.mask.to(device),
                           position_ids=positions_from_mask(probe.mask).to(device),
                           use_cache=False).logits
            pos = probe.pos.to(device)
            lg = torch.gather(logits, 1, pos[..., None].expand(-1, -1, logits.shape[-1]))
            lp, _ = probe_readout(lg, probe)
            valid = probe.valid.to(device)
            objective = (lp[0] * valid).sum() / valid.sum()
            objective.backward()
    finally:
        handle.remove()
    rows = []
    for la in layers:
        z = acts[la]
        g = z.grad
        b, t, _ = z.shape
        contrib = -(g * z).detach().reshape(b, t, sites.heads_per_layer,
                                            sites.head_dim).sum((0, 1, 3))
        for h in range(sites.heads_per_layer):
            rows.append({"layer": la, "head": h, "attr_d_logprob": float(contrib[h])})
    return pd.DataFrame(rows)


def bootstrap_spearman(x: np.ndarray, y: np.ndarray, n_boot: int = 1000, seed: int = 0
                       ) -> tuple[float, float, float]:
    """Spearman correlation over heads with its bootstrap 95% interval (heads resampled;
    :func:`ih_sweep.report.statistics.spearman_ci`)."""
    from ih_sweep.report.statistics import spearman, spearman_ci

    return (spearman(x, y), *spearman_ci(x, y, n_boot=n_boot, seed=seed))


def plot_scatter(df: pd.DataFrame, score: str, effect: str, path, title: str) -> dict:
    """Effect against induction score, with Spearman rho and its bootstrap 95% interval."""
    from ih_sweep.io_utils import write_figure
    from ih_sweep.report.figures import pyplot

    plt = pyplot()

    d = df.dropna(subset=[score, effect])
    rho, lo, hi = bootstrap_spearman(d[score].to_numpy(), d[effect].to_numpy())
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for layer, g in d.groupby("layer"):
        ax.scatter(g[score], g[effect], s=14, label=f"layer {layer}", alpha=0.8)
    ax.set_xlabel(f"{score} score")
    ax.set_ylabel(effect)
    ax.set_title(f"{title}\nSpearman {rho:.2f} [{lo:.2f}, {hi:.2f}]")
    ax.axhline(0, color="grey", lw=0.8)
    if d["layer"].nunique() <= 12:
        ax.legend(fontsize=7)
    write_figure(path, fig)
    plt.close(fig)
    return {"spearman": rho, "ci_low": lo, "ci_high": hi, "n_heads": len(d)}


def plot_heatmap(df: pd.DataFrame, effect: str, path, title: str) -> None:
    """The effect of ablating each head on its own, layer x head (0 = no effect)."""
    from ih_sweep.report.figures import head_heatmap

    mat = df.pivot(index="layer", columns="head", values=effect)
    head_heatmap(mat.to_numpy(), path, title, effect, diverging=True, layers=list(mat.index))


def write_scan_outputs(df: pd.DataFrame, out_dir, rank_by: str, title: str) -> dict:
    """scan.csv, the scatter of each effect against the ranking score, and the heatmap."""
    from pathlib import Path

    from ih_sweep.io_utils import write_csv, write_json

    out_dir = Path(out_dir)
    df = df.sort_values(["layer", "head"]).reset_index(drop=True)
    write_csv(out_dir / "scan.csv", df)
    stats = {}
    for effect in ("d_accuracy", "d_logprob", "d_repeat_loss", "attr_d_logprob"):
        if effect in df.columns and df[effect].notna().any():
            stats[effect] = plot_scatter(df, rank_by, effect, out_dir / f"scan_{effect}.png",
                                         f"{title}: {effect} vs {rank_by}")
    if "attr_d_logprob" in df.columns and "d_logprob" in df.columns:
        rho, lo, hi = bootstrap_spearman(df["d_logprob"].to_numpy(),
                                         df["attr_d_logprob"].to_numpy())
        stats["attribution_vs_exact"] = {"spearman": rho, "ci_low": lo, "ci_high": hi}
    plot_heatmap(df, "d_accuracy" if "d_accuracy" in df.columns else "d_repeat_loss",
                 out_dir / "scan_heatmap.png", f"{title}: single-head ablation effect")
    write_json(out_dir / "scan_stats.json", stats)
    return stats

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from ih_sweep import data
from ih_sweep.pipeline import head_scan as scan
from ih_sweep.testing import scan_by_full_reruns

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def probes(tiny):
    _, tok = tiny
    items = data.make_items(data.generate_stories(40, seed=3), "last")
    return {"babi": scan.babi_probe(tok, items), "repeat": scan.repeat_probe(tok, 6)}


@pytest.fixture(scope="module")
def exact(tiny, probes):
    return scan.exact_scan(tiny[0], probes, heads_per_pass=11)


def test_scan_effects_equal_separate_full_model_ablation(tiny, probes, exact):
    heads = [(0, 0), (0, 13), (1, 4), (1, 31)]
    ref = scan_by_full_reruns(tiny[0], probes, heads).set_index(["layer", "head"])
    got = exact.set_index(["layer", "head"]).loc[heads]
    assert got.d_logprob.to_numpy() == pytest.approx(ref.d_logprob.to_numpy(), abs=1e-4)
    assert got.d_accuracy.to_numpy() == pytest.approx(ref.d_accuracy.to_numpy(), abs=1e-9)
    assert got.d_repeat_loss.to_numpy() == pytest.approx(ref.d_repeat_loss.to_numpy(),
                                                         abs=1e-4)
    assert (ref.d_repeat_loss.abs() > 1e-3).any()  # the heads do something


def test_layer0_heads_the_circuit_needs_show_up(exact):
    """Previous-token heads in layer 0 feed the induction heads: some single layer-0 heads
    raise the repeat loss far more than a typical head."""
    l0 = exact[exact.layer == 0]["d_repeat_loss"]
    assert l0.max() > 0.2 and l0.max() > 20 * max(l0.median(), 1e-3)


def test_attribution_is_minus_grad_dot_z(tiny, probes):
    """Check the estimate against autograd through a per-head scale at 1 (independent)."""
    model, _ = tiny
    att = scan.attribution_scan(model, probes["babi"], layers=[1])
    from ih_sweep.model.architecture import head_sites

    sites = head_sites(model)
    alpha = torch.ones(sites.heads_per_layer, requires_grad=True)
    hd = sites.head_dim
    h = sites.out_proj[1].register_forward_pre_hook(
        lambda m, a: (a[0] * alpha.repeat_interleave(hd), *a[1:]))
    try:
        with torch.enable_grad():
            lg = model(input_ids=probes["babi"].ids, attention_mask=probes["babi"].mask).logits
            lg = torch.gather(lg, 1, probes["babi"].pos[..., None].expand(-1, -1,
                                                                          lg.shape[-1]))
            lp, _ = scan.probe_readout(lg, probes["babi"])
            v = probes["babi"].valid
            ((lp[0] * v).sum() / v.sum()).backward()
    finally:
        h.remove()
    # zero ablation moves alpha from 1 to 0: first-order change = -d obj / d alpha
    assert att["attr_d_logprob"].to_numpy() == pytest.approx(-alpha.grad.numpy(), abs=1e-5)


def test_bootstrap_spearman():
    import numpy as np

    x = np.arange(30.0)
    rho, lo, hi = scan.bootstrap_spearman(x, x ** 2, 200)
    assert rho == pytest.approx(1.0) and lo <= 1.0 <= hi + 1e-9


@pytest.mark.slow
def test_scan_task_split_by_layer_and_merged(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "ih_sweep", "-m", "job=scan", "scan.layers=[0],[1]",
         "scan.n_stories=30", "scan.repeat_sequences=4", f"hydra.sweep.dir={tmp_path}",
         f"paths.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = sorted(tmp_path.glob("*/scan.csv"))
    assert len(parts) == 2
    assert {tuple(pd.read_csv(p)["layer"].unique()) for p in parts} == {(0,), (1,)}
    merged = pd.read_csv(tmp_path / "scan.csv")
    assert len(merged) == 64 and not merged[["layer", "head"]].duplicated().any()
    for col in ("prefix", "copying", "d_accuracy", "d_logprob", "d_repeat_loss",
                "attr_d_logprob"):
        assert merged[col].notna().all(), col
    stats = json.loads((tmp_path / "scan_stats.json").read_text())
    assert "attribution_vs_exact" in stats and "d_repeat_loss" in stats
    for png in ("scan_heatmap.png", "scan_d_accuracy.png", "scan_d_repeat_loss.png"):
        assert (tmp_path / png).stat().st_size > 1000

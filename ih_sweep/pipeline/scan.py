"""The ``scan`` job: every head (of ``scan.layers``) ablated on its own, its effect on bAbI
and on repeated sequences set against its scores (``scan.csv`` and plots; see
:mod:`ih_sweep.pipeline.head_scan`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ih_sweep.config.identity import config_hash
from ih_sweep.config.schema import Config, RankBy
from ih_sweep.fingerprints import job_inputs
from ih_sweep.pipeline.records import ScanRecord, finished_record, write_record

log = logging.getLogger("ih_sweep")


def run(config: Config, out_dir: Path) -> ScanRecord:
    """Write scan.csv, its plots and job.json into ``out_dir``; skip if already complete."""
    chash = config_hash(config)
    inputs = job_inputs(config)  # the input files by content, recorded beside the hash
    previous = finished_record(out_dir, chash, "scan.csv", inputs)
    if previous is not None:
        log.info("skipping %s: a complete scan exists for this config", out_dir)
        return previous  # type: ignore[return-value]
    from dataclasses import replace

    from ih_sweep.config.errors import ConfigError
    from ih_sweep.data import load_stories, make_items
    from ih_sweep.heads.score_table import get_scores
    from ih_sweep.model.batching import scan_heads_per_pass
    from ih_sweep.model.loading import layers_and_heads, load_model
    from ih_sweep.pipeline.head_scan import (
        attribution_scan,
        babi_probe,
        exact_scan,
        repeat_probe,
        write_scan_outputs,
    )

    n_layers, _ = layers_and_heads(config.model)
    outside = [la for la in config.scan.layers or [] if la >= n_layers]
    if outside:
        raise ConfigError(f"scan.layers={list(config.scan.layers)}: the model has {n_layers} "
                          f"layers; allowed: layer indices 0 to {n_layers - 1}")
    t0 = time.time()
    model, tokenizer = load_model(config.model, config.quantization, config.device)
    scores, _ = get_scores(config, lambda: (model, tokenizer))
    stories = load_stories(replace(config.data, n_stories=config.scan.n_stories))
    items = make_items(stories, "last")
    layers = list(config.scan.layers) if config.scan.layers is not None else None
    probes = {"babi": babi_probe(tokenizer, items),
              "repeat": repeat_probe(tokenizer, config.scan.repeat_sequences,
                                     seed=config.scan.seed)}
    t_exact = time.time()
    df = exact_scan(model, probes, layers,
                    scan_heads_per_pass(config.scan.heads_per_pass, model, probes))
    t_exact = time.time() - t_exact
    if config.scan.attribution:
        df = df.merge(attribution_scan(model, probes["babi"], layers), on=["layer", "head"])
    fv = ["fv"] if config.scoring.uses(RankBy.fv) else []  # computed for this job only
    df = df.merge(scores[["layer", "head", "prefix", "copying", "combined", *fv]],
                  on=["layer", "head"], how="left")
    stats = write_scan_outputs(df, out_dir, config.scoring.rank_by.value, config.model.name)
    record = ScanRecord(config_hash=chash, model=config.model.name,
                        layers=sorted(int(x) for x in df["layer"].unique()),
                        n_items=len(items), rank_by=config.scoring.rank_by.value, stats=stats,
                        timings={"exact_s": round(t_exact, 2),
                                 "total_s": round(time.time() - t0, 2)}, inputs=inputs)
    write_record(out_dir, record)
    log.info("wrote the scan of %d heads to %s", len(df), out_dir)
    return record

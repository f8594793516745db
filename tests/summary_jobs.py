"""Finished job folders written through the project's records, for the summary tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ih_sweep.io_utils import read_json, write_json
from ih_sweep.pipeline.records import (
    RESULT_COLUMNS,
    SEAL,
    EvaluationRecord,
    record_checksum,
    sha256,
    write_record,
)


def make_job(root, name, n, cond, correct, seed=0, model="tiny", scope="last", examples=None,
             settings=None, config_hash="0" * 16, extra=None, mechanism=None, scores_file=None,
             rank_by="prefix"):
    """A finished job folder written through the project's records. ``extra``: per-item
    columns beyond the writer's (near_tie, gold_logprob, strata, ...: {column: values});
    ``mechanism``: job.json's mechanism dict."""
    folder = root / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("{}\n")
    rows = []
    for i, c in enumerate(correct):
        rows.append({"story": i, "question_index": 4, "line": 14,
                     "examples_before": examples[i] if examples else 4, "answer": "office",
                     "continuation": "office", "correct": bool(c), "decided_by": "forward",
                     "n_heads": n, "condition": cond, "control_seed": seed, "model": model,
                     "quantization": "none", "data": "babi_generated", "babi_task": 1,
                     "split": "generated", "metric": "contains", "scope": scope,
                     "ablation": "zero"})
        rows[-1] |= {k: v[i] for k, v in (extra or {}).items()}
    columns = RESULT_COLUMNS + [k for k in (extra or {}) if k not in RESULT_COLUMNS]
    pd.DataFrame(rows, columns=columns).to_csv(folder / "results.csv", index=False)
    write_record(folder, EvaluationRecord(
        config_hash=config_hash, settings=settings or {}, n_heads=n, condition=cond,
        control_seed=seed, model=model, quantization="none",
        data={"name": "babi_generated", "task": 1, "n_stories": len(correct), "seed": 0},
        eval={"metric": "contains", "scope": scope, "max_new_tokens": 3}, ablation="zero",
        rank_by=rank_by, n_items=len(correct), n_correct=int(sum(correct)),
        accuracy=float(np.mean(correct)), n_decoded=0, scores_file=scores_file,
        heads=[[0, h] for h in range(n)] if scores_file else [],
        results_sha256=sha256(folder / "results.csv"), mechanism=mechanism or {}))
    return folder


def edit_record(folder, changes=None, drop=()):
    """Change (``changes``) or remove (``drop``) keys of ``folder``'s job.json and seal it
    again, as a job of another version would have written it; results.csv's checksum is
    that of the file there now."""
    record = {k: v for k, v in read_json(folder / "job.json").items() if k not in drop}
    record |= (changes or {}) | {"results_sha256": sha256(folder / "results.csv")}
    write_json(folder / "job.json", record | {SEAL: record_checksum(record)})

"""The ``score`` job: the head score table (computed or read, see
:mod:`ih_sweep.heads.score_table`) written with its heatmap into the job folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ih_sweep.config.schema import Config
from ih_sweep.io_utils import write_csv

log = logging.getLogger("ih_sweep")


def run(config: Config, out_dir: Path) -> dict[str, Any]:
    """Write ``scores.csv`` and ``scores.png`` into ``out_dir``."""
    from ih_sweep.heads.score_table import get_scores, save_heatmap
    from ih_sweep.model.loading import load_model

    scores, cached = get_scores(
        config, lambda: load_model(config.model, config.quantization, config.device),
        progress=True)
    write_csv(out_dir / "scores.csv", scores)
    save_heatmap(scores, config.scoring.rank_by, out_dir / "scores.png", config.model.name)
    top = scores.sort_values(str(config.scoring.rank_by), ascending=False).head(10)
    log.info("top heads by %s:\n%s", config.scoring.rank_by, top.to_string(index=False))
    log.info("wrote %s and %s", out_dir / "scores.csv", out_dir / "scores.png")
    return {"scores": str(out_dir / "scores.csv"), "cache": str(cached) if cached else None}

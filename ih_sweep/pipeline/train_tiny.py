"""The ``train_tiny`` job: retrain the bundled tiny model from its recipe (``train``) into
``train.out_dir`` (weights, tokenizer, training.json and its model card)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ih_sweep.config.schema import Config

log = logging.getLogger("ih_sweep")


def run(config: Config, out_dir: Path) -> dict[str, Any]:
    from ih_sweep.model.tiny import train_and_describe

    result = train_and_describe(config.train, Path(config.train.out_dir))
    log.info("wrote the tiny model to %s", config.train.out_dir)
    return result

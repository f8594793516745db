"""Shared fixtures. Tests needing ../shared skip cleanly when it is absent."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IH_SWEEP_SHARED", ROOT.parent / "shared"))
BABI = SHARED / "babi"
SEED_SCORES = SHARED / "seed" / "ih_scores_dict.pkl"
FIXTURES = Path(__file__).parent / "fixtures"

needs_babi = pytest.mark.skipif(not BABI.is_dir(), reason=f"{BABI} is absent")
needs_seed = pytest.mark.skipif(not SEED_SCORES.is_file(), reason=f"{SEED_SCORES} is absent")


@pytest.fixture(autouse=True)
def _logging_as_it_was():
    """Each test leaves logging as it found it: a command run in this process (Hydra's
    job_logging) sets the root logger's level and adds handlers bound to the streams of
    that test's capture, which later tests would count records against or write to after
    they are closed."""
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    state = [(lg, lg.level, list(lg.handlers), lg.propagate, lg.disabled) for lg in loggers]
    yield
    for lg, level, handlers, propagate, disabled in state:
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate, lg.disabled = propagate, disabled


@pytest.fixture(autouse=True)
def _process_memo_per_test():
    """Each test starts with an empty process memo of items and rows
    (:data:`ih_sweep.pipeline.draws.PROCESS`): a test that changes what makes the items
    (a monkeypatched generator) gets them made afresh. Jobs within one test share it, as a
    sweep's jobs do."""
    from ih_sweep.pipeline.draws import PROCESS

    PROCESS.clear()
    yield
    PROCESS.clear()


@pytest.fixture(scope="session")
def tiny():
    """The shipped tiny model, loaded through the real from_pretrained path (once)."""
    from ih_sweep.config.schema import DType, ModelConfig, QuantizationConfig
    from ih_sweep.model.loading import load_model

    torch.set_num_threads(2)
    return load_model(ModelConfig(name="tiny", path="builtin:tiny", dtype=DType.float32),
                      QuantizationConfig(), "cpu")


@pytest.fixture(scope="session")
def tiny_prefix(tiny):
    """[layers, heads] prefix-matching scores of the shipped tiny model."""
    from ih_sweep.config.schema import ScoringConfig
    from ih_sweep.heads.scoring import score_heads, score_matrix
    from ih_sweep.model.loading import eager_attention

    model, tok = tiny
    with eager_attention(model):
        return score_matrix(score_heads(model, tok, ScoringConfig()), "prefix")

"""ih_sweep.model.devices: the line a job logs where bfloat16 is emulated (issue #33: the
compute dtype on a card without bfloat16, a T4)."""

from __future__ import annotations

import logging

import torch

from ih_sweep.config.schema import QuantizationConfig
from ih_sweep.model.devices import bf16_emulation_note, log_bf16_emulation


def test_a_t4_computing_in_bfloat16_is_told_it_is_emulated():
    note = bf16_emulation_note("Tesla T4", (7, 5), {"float16", "bfloat16"})
    assert note is not None and note.startswith(
        "Tesla T4 (compute capability 7.5) has no bfloat16 hardware: PyTorch emulates it")
    assert "quantization.compute_dtype=float16 model.dtype=float16" in note
    assert "\n" not in note


def test_hardware_bfloat16_or_no_bfloat16_says_nothing():
    assert bf16_emulation_note("NVIDIA A100", (8, 0), {"bfloat16"}) is None
    assert bf16_emulation_note("NVIDIA H100", (9, 0), {"bfloat16"}) is None
    assert bf16_emulation_note("Tesla T4", (7, 5), {"float16"}) is None
    assert bf16_emulation_note("Tesla V100", (7, 0), {"float32"}) is None


def test_a_cpu_model_logs_nothing(caplog):
    with caplog.at_level(logging.WARNING):
        log_bf16_emulation(torch.nn.Linear(2, 2).to(torch.bfloat16), QuantizationConfig())
    assert not caplog.records

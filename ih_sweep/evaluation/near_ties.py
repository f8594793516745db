"""Near-ties: greedy steps whose top-1 and top-2 logits are within the rounding of the
model's compute dtype, so that another batch size, padding or kernel could swap the tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# A greedy step is a near-tie when its top-1 minus top-2 logit gap is at most this fraction
# of the top-1 logit's magnitude (at least 1), by the dtype the model computes in: within that
# band another batch size, padding or kernel (other rounding) can swap the two tokens. An
# outcome can flip only where the gap is smaller than the change of the gap between two
# numerically different runs, so the tolerance is the largest such change measured, rounded
# up. Measured on the tiny model on CPU (2-core x86_64), batch_size=1 against the default 32,
# 200 stories x {unablated, top-16 ablated} x 2 data seeds, at every greedy step whose
# context is the same in both runs (``benchmarks/near_ties.py``):
# - bfloat16: the gap changes by up to 0.036 x |top-1| (0.56 logits at top-1 ~20; bf16's
#   relative precision is 2**-7 = 0.0078 and two 2-layer runs differ by a few units of it);
#   3 outcomes flipped, at gaps of 0 to 0.0056 x |top-1|. Tolerance 0.05 (~6 units).
# - float32: the gap changes by up to 3e-6 x |top-1|, no outcome flipped. Tolerance 5e-6,
#   the measured change rounded up as bfloat16's is. (1e-4, the run-time check's bound, is
#   33x the measured change: it flagged 9 items of the default sweep's 7,000 whose gaps of
#   1.2e-4 to 7.7e-4 logits lie between two filler tokens, 2-13x beyond any change measured.)
# - float16 (not measured on CPU): bfloat16's scaled by their precisions (2**-10 vs 2**-7).
# Deeper models accumulate more rounding; a GPU check of a large model may call for more.
NEAR_TIE_TOLERANCE = {torch.float32: 5e-6, torch.float64: 5e-6, torch.bfloat16: 5e-2,
                      torch.float16: 5e-2 / 8}


def compute_dtype(model) -> torch.dtype:
    """The least precise floating dtype the model computes in: among its embedding and
    unembedding weights and, under bitsandbytes quantization, its quantized layers' matmuls
    (:func:`_quantized_compute_dtypes`: nf4's ``bnb_4bit_compute_dtype``, bfloat16 by
    default, even where the embeddings stay float32); float32 when none is lower."""
    dtypes = [m.weight.dtype for m in (model.get_input_embeddings(),
                                       model.get_output_embeddings())
              if m is not None and m.weight.is_floating_point()]
    dtypes += _quantized_compute_dtypes(model)
    return min(dtypes, key=lambda d: torch.finfo(d).bits, default=torch.float32)


def _quantized_compute_dtypes(model) -> set[torch.dtype]:
    """The dtypes bitsandbytes layers compute in: a ``Linear4bit``'s ``compute_dtype``
    (none set: its input's, which the other dtypes already cover); bfloat16 standing for
    LLM.int8()'s 8-bit matmul, whose rounding (activations in int8, outlier columns
    chosen over the whole batch) is no finer than bfloat16's."""
    out = set()
    for module in model.modules():
        if not type(module).__module__.startswith("bitsandbytes"):
            continue
        if type(module).__name__.startswith("Linear8bit"):
            out.add(torch.bfloat16)
        dtype = getattr(module, "compute_dtype", None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            out.add(dtype)
    return out


def near_tie_tolerance(model) -> float:
    """:data:`NEAR_TIE_TOLERANCE` of the model's compute dtype (:func:`compute_dtype`)."""
    return NEAR_TIE_TOLERANCE.get(compute_dtype(model), NEAR_TIE_TOLERANCE[torch.bfloat16])


def near_tie(gaps: Sequence[float], tops: Sequence[float], tolerance: float) -> bool:
    """Whether some step's top-1 minus top-2 gap is within ``tolerance`` x max(|top-1|, 1)."""
    return any(g <= tolerance * max(abs(t), 1.0) for g, t in zip(gaps, tops))

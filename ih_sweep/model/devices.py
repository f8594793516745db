"""What a CUDA card does with the dtype a job computes in.

bfloat16 has hardware support from compute capability 8.0 (Ampere: A100, A10, RTX 30xx, L4,
H100). Below it (Turing's T4 and RTX 20xx at 7.5, Volta's V100 at 7.0) PyTorch emulates it:
each operation widens its bfloat16 inputs to float32, computes and rounds back, so a job runs
and gives bfloat16's numbers, only slower; ``torch.cuda.is_bf16_supported()`` still answers
True there, as its ``including_emulation=True`` default counts the emulation (PyTorch
pull request #148322; ``is_bf16_supported(including_emulation=False)`` is the hardware
question). float16 is native on those cards but rounds differently (10 mantissa bits, not
7; a range up to 65,504), so near-ties can fall the other way: the two are different runs.

The notebook study computed nf4 in bfloat16 (``bnb_4bit_compute_dtype=torch.bfloat16``) on
a Colab T4, i.e. emulated; ``quantization=nf4`` keeps that (``quantization.compute_dtype``).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

BF16_CAPABILITY = (8, 0)  # the first compute capability with bfloat16 hardware (Ampere)


def bf16_emulation_note(name: str, capability: tuple[int, int], dtypes: set[str]) -> str | None:
    """The one line a job logs when it computes in bfloat16 (``"bfloat16"`` among
    ``dtypes``: the model's dtype and, under nf4, its compute dtype) on a CUDA card ``name``
    of compute ``capability`` (major, minor) below :data:`BF16_CAPABILITY`; None where
    bfloat16 runs in hardware or is not used."""
    if "bfloat16" not in dtypes or tuple(capability) >= BF16_CAPABILITY:
        return None
    return (f"{name} (compute capability {capability[0]}.{capability[1]}) has no bfloat16 "
            "hardware: PyTorch emulates it (bfloat16's numbers, computed through float32, "
            "slower), as the notebook study's nf4 on a T4 did; float16 runs natively there "
            "but rounds differently (quantization.compute_dtype=float16 model.dtype=float16: "
            "another run, near-ties may change)")


def pick_device(requested: str | None = "auto") -> str:
    """The device a model loads on: ``cuda`` where there is one for ``auto`` (or None),
    else ``cpu``; any other name as it is."""
    if requested in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def log_bf16_emulation(model, quant) -> None:
    """Log :func:`bf16_emulation_note` for the CUDA device ``model``'s first parameter is
    on (nothing off CUDA): the dtypes are the model's and, under nf4, ``quant``'s
    (:class:`~ih_sweep.config.schema.QuantizationConfig`) compute dtype."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return
    import torch

    dtypes = {str(model.dtype).removeprefix("torch.")}
    if str(getattr(quant.name, "value", quant.name)) == "nf4":
        dtypes.add(str(getattr(quant.compute_dtype, "value", quant.compute_dtype)))

    note = bf16_emulation_note(torch.cuda.get_device_name(device),
                               torch.cuda.get_device_capability(device), dtypes)
    if note:
        log.warning("%s", note)

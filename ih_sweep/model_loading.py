"""Loading models and tokenizers: the bundled tiny model and any Hugging Face causal LM,
optionally 4-bit (nf4) or 8-bit quantized, through the same ``from_pretrained`` path.

Loaded models are cached per process, so a basic-launcher multirun loads each model once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .schema import DType, Quantization

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
ASSET_DIR = Path(__file__).parent / "assets" / "tiny"  # builtin:tiny (see tiny_model.py)
_CACHE: dict[str, tuple[Any, Any]] = {}


def resolve_path(path: str) -> str:
    """``builtin:tiny`` -> the packaged weights; anything else is a hub id or local folder."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        if name != "tiny":
            raise ValueError(f"model.path={path!r}: the only built-in model is builtin:tiny")
        if not (ASSET_DIR / "config.json").is_file():
            raise FileNotFoundError(f"{ASSET_DIR}: the tiny model's files are missing; retrain "
                                    "with `ih-sweep job=train_tiny`")
        return str(ASSET_DIR)
    return path


def quantization_config(quant: dict):
    """BitsAndBytesConfig for ``nf4`` (the notebook's: 4-bit nf4, double quant, bf16 compute)."""
    name = quant.get("name", Quantization.none)
    if name == Quantization.none:
        return None
    from transformers import BitsAndBytesConfig

    if name == Quantization.nf4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=bool(quant.get("double_quant", True)),
                                  bnb_4bit_compute_dtype=_dtype(quant.get("compute_dtype",
                                                                          "bfloat16")))
    if name == Quantization.int8:
        return BitsAndBytesConfig(load_in_8bit=True)
    allowed = ", ".join(m.value for m in Quantization)
    raise ValueError(f"quantization.name={name!r}; allowed values: {allowed}")


def _dtype(name: str | None):
    if name is None or name == DType.auto:
        return "auto"
    allowed = [m.value for m in DType]
    if name not in allowed:
        raise ValueError(f"model.dtype={name!r}; allowed values: {', '.join(allowed)}")
    return getattr(torch, DType(name).value)


def pick_device(requested: str | None = "auto") -> str:
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def load_config(model_cfg: dict):
    """The model's config alone (no weights): head counts, for checks before loading."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_path(model_cfg["path"]),
                                      revision=model_cfg.get("revision"),
                                      trust_remote_code=bool(model_cfg.get("trust_remote_code")))


def cache_key(model_cfg: dict, quant_cfg: dict, device: str) -> str:
    return json.dumps({"model": model_cfg, "quant": quant_cfg, "device": device}, sort_keys=True,
                      default=str)


def load_model(model_cfg: dict, quant_cfg: dict | None = None, device: str = "auto"):
    """(model, tokenizer), cached per process. Eval mode, no grad needed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quant_cfg = quant_cfg or {"name": "none"}
    device = pick_device(device)
    key = cache_key(model_cfg, quant_cfg, device)
    if key in _CACHE:
        return _CACHE[key]
    path = resolve_path(model_cfg["path"])
    kwargs: dict[str, Any] = {
        "revision": model_cfg.get("revision"),
        "trust_remote_code": bool(model_cfg.get("trust_remote_code")),
        "attn_implementation": model_cfg.get("attn_implementation") or "sdpa",
        "dtype": _dtype(model_cfg.get("dtype")),
    }
    qc = quantization_config(quant_cfg)
    device_map = model_cfg.get("device_map")
    if qc is not None:
        kwargs["quantization_config"] = qc
        device_map = device_map or ("auto" if device == "cuda" else {"": device})
    if device_map is not None:
        kwargs["device_map"] = device_map
    log.info("loading %s (quantization=%s, device=%s)", path, quant_cfg.get("name"), device)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device_map is None:
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_cfg.get("revision"),
                                              trust_remote_code=bool(
                                                  model_cfg.get("trust_remote_code")))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    _CACHE[key] = (model, tokenizer)
    return model, tokenizer


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """Temporarily use eager attention: sdpa returns no attention probabilities.
    (:func:`.architecture.attention_implementation`: restored on exit; a model that cannot
    switch raises AttentionSwitchError.)"""
    from .architecture import attention_implementation

    with attention_implementation(model, "eager"):
        yield


def model_slug(model_cfg: dict, quant_cfg: dict | None = None) -> str:
    """Filesystem-safe name of a model (+ quantization) for cache files."""
    base = str(model_cfg.get("name") or model_cfg["path"]).replace("/", "__").replace(":", "_")
    q = (quant_cfg or {}).get("name", "none")
    rev = model_cfg.get("revision")
    return base + (f"@{rev}" if rev else "") + ("" if q == "none" else f"-{q}")

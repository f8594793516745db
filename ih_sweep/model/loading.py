"""Loading models and tokenizers (torch and transformers are imported when a model is, so
that checking a model path is cheap): the bundled tiny model and any Hugging Face causal LM,
optionally 4-bit (nf4) or 8-bit quantized, through the same ``from_pretrained`` path. Every
function takes the typed settings (:class:`~ih_sweep.config.schema.ModelConfig`,
:class:`~ih_sweep.config.schema.QuantizationConfig`), as the job's config holds them.

Loaded models are cached per process, so a basic-launcher multirun loads each model once.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ih_sweep.config.errors import UserError, one_line
from ih_sweep.config.plain import plain
from ih_sweep.config.schema import DType, ModelConfig, Quantization, QuantizationConfig
from ih_sweep.model.devices import log_bf16_emulation, pick_device
from ih_sweep.model.runtime import long_lived

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny"  # builtin:tiny
_CACHE: dict[str, tuple[Any, Any]] = {}


class ModelPathError(UserError):
    """A model.path that names no usable model (a local path without one, or a hub id the
    hub cannot provide here)."""

    kind = "model"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_path(path: str) -> str:
    """``builtin:tiny`` -> the packaged weights; a local folder must hold a model's
    ``config.json``; anything else must look like a hub id (``org/name``). Raises
    :class:`ModelPathError` naming ``model.path`` otherwise."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        if name != "tiny":
            raise ModelPathError(f"model.path={path}: the only built-in model is builtin:tiny")
        if not (ASSET_DIR / "config.json").is_file():
            raise ModelPathError(f"{ASSET_DIR}: the tiny model's files are missing; retrain "
                                 "with `ih-sweep job=train_tiny`")
        return str(ASSET_DIR)
    local = Path(path).expanduser()
    if local.exists():
        if local.is_dir():
            from ih_sweep.model.files import check_readable

            check_readable(local)  # not "no config.json" for a folder it may not list
        if local.is_file():
            raise ModelPathError(f"model.path={path}: is a file; give the model's folder (the "
                                 "one holding config.json and the weights) or a hub id")
        if not (local / "config.json").is_file():
            raise ModelPathError(f"model.path={path}: the folder holds no config.json; give "
                                 "a model folder as save_pretrained writes it, or a hub id")
        return str(local)
    if not _HUB_ID.match(path) or path.startswith((".", "/", "~")):
        raise ModelPathError(f"model.path={path}: no such folder, and not a hub id "
                             "(org/name)")
    return path


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` s (so an
    offline machine fails in seconds, not after the hub client's retries)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_hub(load, path: str, what: str):
    """``load(local_files_only)`` for a hub id: the local Hugging Face cache first, then
    the hub if it answers; a :class:`ModelPathError` naming model.path when neither has it."""
    from huggingface_hub import constants

    try:
        return load(True)
    except OSError:
        pass
    if constants.HF_HUB_OFFLINE or not hub_reachable():
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else \
            "the Hugging Face hub does not answer from here"
        raise ModelPathError(
            f"model.path={path}: {what} is not in the local Hugging Face cache and {why}; "
            f"download it where there is network (hf download {path} --local-dir DIR) and "
            "give that folder: model.path=DIR") from None
    try:
        return load(False)
    except OSError as err:
        first = one_line(err) or type(err).__name__
        raise ModelPathError(f"model.path={path}: the hub could not provide {what} "
                             f"({first})") from None


def quantization_config(quant: QuantizationConfig):
    """transformers' BitsAndBytesConfig for ``quantization`` (None for ``none``): ``nf4`` is
    the notebook's (4-bit NormalFloat, double quant, bf16 compute by default), ``int8``
    LLM.int8(). Raises ValueError for a name or compute dtype outside the schema's Enums."""
    name = quant.name
    if name == Quantization.none:
        return None
    from transformers import BitsAndBytesConfig

    if name == Quantization.nf4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=bool(quant.double_quant),
                                  bnb_4bit_compute_dtype=_dtype(quant.compute_dtype))
    if name == Quantization.int8:
        return BitsAndBytesConfig(load_in_8bit=True)
    allowed = ", ".join(m.value for m in Quantization)
    raise ValueError(f"quantization.name={name!r}; allowed values: {allowed}")


def _dtype(name: DType | str | None):
    if name is None or name == DType.auto:
        return "auto"
    allowed = [m.value for m in DType]
    if name not in allowed:
        raise ValueError(f"model.dtype={name!r}; allowed values: {', '.join(allowed)}")
    import torch

    return getattr(torch, DType(name).value)


def _load_files(load, path: str, given: str, what: str):
    """``load(local_files_only)`` from a local folder (a :class:`ModelPathError` naming
    model.path when the folder lacks the files) or from the hub (:func:`_from_hub`)."""
    if Path(path).is_dir():
        try:
            return load(True)
        except (OSError, ValueError) as err:
            first = one_line(err)
            raise ModelPathError(f"model.path={given}: the folder does not hold {what} "
                                 f"({first})") from None
    return _from_hub(load, path, what)


_CONFIGS: dict[str, Any] = {}  # local folders' configs, by folder stamp and settings


def load_config(model: ModelConfig):
    """The model's transformers config alone (no weights): head counts, for checks before
    loading. Raises :class:`ModelPathError` for a path or hub id that gives none. A local
    folder's config is read once per process for each state of its files
    (:func:`folder_stamp`); each caller gets its own copy."""
    from transformers import AutoConfig

    path = resolve_path(model.path)
    key = folder_stamp(Path(path)) + json.dumps([model.path, model.revision, bool(
        model.trust_remote_code)]) if Path(path).is_dir() else ""  # "": a hub id, read anew
    if not key or key not in _CONFIGS:
        _CONFIGS[key] = _load_files(lambda local_only: AutoConfig.from_pretrained(
            path, revision=model.revision, local_files_only=local_only,
            trust_remote_code=bool(model.trust_remote_code)), path, model.path, "its config")
    return _CONFIGS.pop(key) if not key else copy.deepcopy(_CONFIGS[key])


def layers_and_heads(model: ModelConfig) -> tuple[int, int]:
    """(layers, query heads per layer) from the model's config file alone (no weights),
    after :func:`check_architecture` (an unsupported structure is refused here, before any
    work). Raises :class:`ModelPathError` or
    :class:`~ih_sweep.model.architecture.UnsupportedArchitecture`."""
    from ih_sweep.model.architecture import config_shape

    config = load_config(model)
    check_architecture(config, bool(model.trust_remote_code))
    return config_shape(config)


_CHECKED: dict[str, None] = {}  # configs whose structure passed, by their JSON


def check_architecture(config, trust_remote_code: bool = False) -> None:
    """Build the model of ``config`` without weights (on PyTorch's meta device: no memory,
    well under a second for 7B) and find its heads and their path to the logits
    (:func:`.architecture.head_sites`), so that a structure the tool cannot handle is
    refused with one :class:`~.architecture.UnsupportedArchitecture` line before any
    weights load or any scoring or evaluation runs."""
    import torch
    from transformers import AutoModelForCausalLM

    from ih_sweep.model.architecture import UnsupportedArchitecture, head_sites

    key = config.to_json_string()
    if key in _CHECKED:
        return
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                     attn_implementation="eager")
    except ValueError as err:  # transformers: no causal-LM class for this config
        first = one_line(err) or type(err).__name__
        raise UnsupportedArchitecture(f"{type(config).__name__}: not a causal language model "
                                      f"transformers can build ({first[:160]})") from None
    head_sites(model)
    _CHECKED[key] = None


def check_local_model(model: ModelConfig) -> None:
    """A local model folder's files before any job runs (:mod:`ih_sweep.model.files`):
    readable, whole weights, config.json fitting them; nothing for a hub id (its files
    come when the job loads it). Raises :class:`ModelPathError` or
    :class:`~ih_sweep.model.files.ModelFileError`."""
    from ih_sweep.model.files import check_model_folder

    path = resolve_path(model.path)
    if not Path(path).is_dir():
        return
    config = load_config(model)
    check_model_folder(Path(path), config, bool(model.trust_remote_code))
    check_pad_token(path, config, bool(model.trust_remote_code))


_PADDED: set[str] = set()  # tokenizer folders whose pad token was found, by their files
_TOKENIZERS: dict[str, Any] = {}  # local tokenizers read by checks, by their folder's files


def folder_stamp(folder: Path) -> str:
    """The names, sizes and modification times of a folder's files: what a check that read
    them once in this process keys its result by."""
    return json.dumps(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                             for e in folder.iterdir() if e.is_file()) + [str(folder)])


def local_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer of the local model folder ``path``, read once per process for each
    state of the folder's files (for checks before any job; the job loads its own with the
    model). Raises :class:`ModelPathError` when the folder holds no tokenizer."""
    from transformers import AutoTokenizer

    stamp = folder_stamp(Path(path))
    if stamp not in _TOKENIZERS:
        _TOKENIZERS[stamp] = _load_files(lambda local: AutoTokenizer.from_pretrained(
            path, local_files_only=local, trust_remote_code=trust_remote_code), path, path,
            "its tokenizer")
    return _TOKENIZERS[stamp]


def check_pad_token(path: str, config, trust_remote_code: bool = False) -> None:
    """The tokenizer of the local model folder ``path`` has a pad token, or an eos token,
    or ``config`` (its config.json) or generation_config.json names a pad id
    (:func:`ih_sweep.model.tokens.settle_pad`); the tokenizer files are read, not the
    weights. Raises :class:`~ih_sweep.model.tokens.NoPadToken` naming the folder."""
    from transformers import GenerationConfig

    from ih_sweep.model.tokens import settle_pad

    folder = Path(path)
    stamp = folder_stamp(folder)
    if stamp in _PADDED:
        return
    tokenizer = local_tokenizer(path, trust_remote_code)
    generation = None
    if (folder / "generation_config.json").is_file():
        try:
            generation = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError):
            generation = None
    settle_pad(tokenizer, path, config, generation)
    _PADDED.add(stamp)


# the class attribute that says whether a transformers model class supports an attention
# implementation (transformers' PreTrainedModel flags; eager is always supported)
_ATTENTION_FLAGS = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn",
                    "flex_attention": "_supports_flex_attn"}


_TOLD_ATTENTION: set[str] = set()  # fallback lines already logged in this process


def attention_unavailable(requested: str, device: str | None = None) -> str | None:
    """Why ``requested`` cannot run here whatever the model (None: it can): flash
    attention 2 needs the ``flash_attn`` package and a CUDA device (transformers raises
    ImportError in every job otherwise); flex attention compiles its kernels with
    ``torch.compile``, which needs a CUDA device with triton (on CPU the compile of its
    C++ kernel fails after a minute). ``device``: where the model runs (None: not known,
    only the packages count)."""
    cpu = device is not None and not str(device).startswith(("cuda", "auto"))
    if requested == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            return "the flash_attn package (with a CUDA GPU) is not available here"
        if cpu:
            return f"it runs on CUDA GPUs only, and the model runs on {device}"
    if requested == "flex_attention":
        import importlib.util

        if cpu:
            return (f"it compiles its kernels for CUDA GPUs (torch.compile), and the model "
                    f"runs on {device}")
        if importlib.util.find_spec("triton") is None:
            return "it compiles its kernels with triton, which is not installed here"
    return None


def supported_attention(config, requested: str, device: str | None = None) -> str:
    """``requested`` where it can run here (:func:`attention_unavailable`: its package, the
    device) and the config's causal-LM class supports it and the config asks for nothing
    it cannot apply, else the first of sdpa, eager that can, said in one log line (once
    per process where it cannot run here). PyTorch's ``scaled_dot_product_attention`` has
    no attention-logit softcap, so a config with ``attn_logit_softcapping`` (Gemma-2)
    never runs under sdpa: transformers 5.24 says so itself
    (``Gemma2ForCausalLM._supports_sdpa`` is False), 5.0 does not and drops the softcap
    silently (issue 34). Remote-code classes are not looked
    up (``requested``, or sdpa where ``requested`` cannot run here). ``device``: where the
    model runs (``model.device_map`` or ``device``; None: not known)."""
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
    missing = attention_unavailable(requested, device)
    if cls is None:
        if missing is None:
            return requested
        _tell(f"model.attn_implementation={requested}: {missing}; using sdpa")
        return "sdpa"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "attn_logit_softcapping", None) is not None

    def supports(name: str) -> bool:
        if name == "sdpa" and softcap:
            return False
        flag = _ATTENTION_FLAGS.get(name)
        return flag is None or bool(getattr(cls, flag, False))

    if missing is None and supports(requested):
        return requested
    chosen = next(name for name in ("sdpa", "eager") if supports(name))
    why = missing if missing is not None else \
        f"{cls.__name__} " + ("its attention logit softcapping needs another"
                              if requested == "sdpa" and softcap else "does not support it")
    line = f"model.attn_implementation={requested}: {why}; using {chosen}"
    if missing is not None:  # decided before the jobs (preflight): once per process
        _tell(line)
    else:
        log.info("%s", line)
    return chosen


def _tell(line: str) -> None:
    """``line`` at INFO, once per process."""
    if line not in _TOLD_ATTENTION:
        _TOLD_ATTENTION.add(line)
        log.info("%s", line)


def attention_choice(model: ModelConfig, device: str = "auto") -> str:
    """The attention implementation a job of ``model`` on ``device`` loads with
    (:func:`supported_attention` on its config), the fallback logged once per process."""
    return supported_attention(load_config(model), str(model.attn_implementation or "sdpa"),
                               placement(model, pick_device(device)))


def placement(model: ModelConfig, device: str) -> str:
    """Where the model's weights go: ``model.device_map`` when it names a device (cpu,
    cuda, cuda:1, mps), else ``device`` (``auto``: cuda where there is one)."""
    dm = model.device_map
    if dm in ("cpu", "mps") or (dm is not None and str(dm).startswith("cuda")):
        return str(dm)
    return pick_device(device) if dm is None else "auto"


def cache_key(model: ModelConfig, quant: QuantizationConfig, device: str) -> str:
    """What names a loaded model in this process: the model and quantization settings and
    the device, as JSON with sorted keys."""
    return json.dumps({"model": plain(model), "quant": plain(quant), "device": device},
                      sort_keys=True, default=str)


def load_model(model: ModelConfig, quant: QuantizationConfig | None = None,
               device: str = "auto"):
    """(model, tokenizer) of the ``model`` settings, quantized as ``quant`` says (None: not
    quantized) on ``device`` (``auto``: cuda where there is one), cached per process
    (:func:`cache_key`). Eval mode, no grad needed. The structure is checked first
    (:func:`check_architecture`); ``model.attn_implementation`` falls back to one the model
    supports (:func:`supported_attention`). Raises :class:`ModelPathError` where the path
    gives no model."""
    quant = quant or QuantizationConfig()
    device = pick_device(device)
    key = cache_key(model, quant, device)
    if key in _CACHE:
        return _CACHE[key]
    with long_lived():  # kept for the whole process: frozen out of the collector's walks
        _CACHE[key] = _load(model, quant, device)
    return _CACHE[key]


def _load(model: ModelConfig, quant: QuantizationConfig, device: str):
    """:func:`load_model` without its cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ih_sweep.model.tokens import settle_pad

    path = resolve_path(model.path)
    config = load_config(model)
    check_architecture(config, bool(model.trust_remote_code))
    qc = quantization_config(quant)
    kwargs: dict[str, Any] = {
        "revision": model.revision,
        "trust_remote_code": bool(model.trust_remote_code),
        "attn_implementation": supported_attention(
            config, str(model.attn_implementation or "sdpa"), placement(model, device)),
        "dtype": _dtype(model.dtype),
    }
    device_map = model.device_map
    if qc is not None:
        kwargs["quantization_config"] = qc
        device_map = device_map or ("auto" if device == "cuda" else {"": device})
    if device_map is not None:
        kwargs["device_map"] = device_map
    log.info("loading %s (quantization=%s, device=%s)", path, quant.name, device)
    loaded, info = _load_files(lambda local: AutoModelForCausalLM.from_pretrained(
        path, local_files_only=local, output_loading_info=True, **kwargs), path, model.path,
        "its weights")
    check_loading_info(info, model.path)
    if device_map is None:
        loaded = loaded.to(device)
    loaded.eval()
    loaded.requires_grad_(False)
    log_bf16_emulation(loaded, quant)
    tokenizer = _load_files(lambda local: AutoTokenizer.from_pretrained(
        path, revision=model.revision, local_files_only=local,
        trust_remote_code=bool(model.trust_remote_code)), path, model.path, "its tokenizer")
    settle_pad(tokenizer, path, loaded.config, getattr(loaded, "generation_config", None))
    return loaded, tokenizer


def check_loading_info(info: dict, given: str) -> None:
    """transformers' loading report (``output_loading_info=True``): weights the model has
    but the files lack (transformers fills them with random values) or hold in another
    shape are refused with one :class:`ModelPathError` naming model.path, the second guard
    behind :func:`check_local_model` (hub models, .bin files)."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing:
        raise ModelPathError(
            f"model.path={given}: the weights lack {len(missing)} tensor(s) the config's "
            f"model has (e.g. {missing[0]}), which transformers would fill with random "
            "values; config.json does not fit the weights")
    if mismatched:
        name = mismatched[0][0] if isinstance(mismatched[0], (list, tuple)) else mismatched[0]
        raise ModelPathError(f"model.path={given}: {len(mismatched)} tensor(s) of the weights "
                             f"have another shape than the config's model (e.g. {name}); "
                             "config.json does not fit the weights")


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """Temporarily use eager attention: sdpa returns no attention probabilities.
    (:func:`.architecture.attention_implementation`: restored on exit; a model that cannot
    switch raises AttentionSwitchError.)"""
    from ih_sweep.model.architecture import attention_implementation

    with attention_implementation(model, "eager"):
        yield


def model_slug(model: ModelConfig, quant: QuantizationConfig | None = None) -> str:
    """Filesystem-safe name of a model (+ revision, + quantization) for cache files: the
    model's name (or path), ``/`` as ``__`` and ``:`` as ``_``; over 120 bytes, a hash of
    the whole and its last 90 bytes."""
    base = str(model.name or model.path).replace("/", "__").replace(":", "_")
    q = quant.name if quant is not None else Quantization.none
    rev = model.revision
    slug = base + (f"@{rev}" if rev else "") + ("" if q == "none" else f"-{q}")
    if len(slug.encode()) > 120:  # a long local path: keep its end and a hash of the whole
        import hashlib

        tail = slug.encode()[-90:].decode(errors="ignore")
        slug = f"{hashlib.sha256(slug.encode()).hexdigest()[:12]}~{tail}"
    return slug


def reset() -> None:
    """Forget the models and tokenizers loaded in this process (the next load reads them
    again)."""
    _CACHE.clear()
    _TOKENIZERS.clear()
    _CONFIGS.clear()

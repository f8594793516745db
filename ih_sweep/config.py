"""Config validation: every bad value is reported with its key and the allowed values,
before any model or data set loads."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .ablation import METHODS
from .data import TASK_NAMES
from .evaluation import METRICS, SCOPES
from .model_loading import DTYPES, QUANTIZATIONS
from .scoring import RANK_BY
from .selection import CONDITIONS

TASKS = ("sweep", "score", "train_tiny", "scan")
DATA_SOURCES = ("babi_generated", "babi_files", "babi_hub")
SCORE_SOURCES = ("compute", "file")
LANGS = ("en", "en-10k", "hn", "hn-10k", "shuffled", "shuffled-10k", "en-valid", "en-valid-10k")
SPLITS = ("train", "test")
# keys that change how fast a job runs, not what it computes
NON_SEMANTIC = ("eval.batch_size", "eval.progress", "eval.checkpoint_items", "eval.cpu_workers",
                "scoring.batch_size", "summarize", "device", "paths", "train")


class ConfigError(ValueError):
    pass


def _allowed(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; allowed values: "
                          f"{', '.join(str(a) for a in allowed)}")


def _int(key: str, value: Any, minimum: int | None = None, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be an integer")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}={value} must be >= {minimum}")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first bad key; cheap (reads no files, loads no model)."""
    _allowed("task", cfg.task, TASKS)
    _allowed("condition", cfg.condition, CONDITIONS)
    _int("n_heads", cfg.n_heads, 0)
    _int("control_seed", cfg.control_seed)
    _allowed("quantization.name", cfg.quantization.name, QUANTIZATIONS)
    _allowed("model.dtype", cfg.model.get("dtype", "auto"), DTYPES)
    if OmegaConf.is_missing(cfg.model, "path"):
        raise ConfigError("model.path is missing: give a hub id or folder, e.g. "
                          "model.path=EleutherAI/pythia-160m")
    data = cfg.data
    _allowed("data.name", data.name, DATA_SOURCES)
    _allowed("data.task", data.task, sorted(TASK_NAMES))
    _int("data.n_stories", data.get("n_stories"), 1, nullable=True)
    if data.name == "babi_generated":
        _allowed("data.task", data.task, [1])
        _int("data.seed", data.seed)
    else:
        _allowed("data.lang", data.lang, LANGS)
        _allowed("data.split", data.split, SPLITS)
    ev = cfg.eval
    _allowed("eval.metric", ev.metric, METRICS)
    _allowed("eval.scope", ev.scope, SCOPES)
    _int("eval.max_new_tokens", ev.max_new_tokens, 1)
    _int("eval.batch_size", ev.batch_size, 1)
    workers = ev.get("cpu_workers", "auto")
    if workers != "auto":
        if not isinstance(workers, int) or isinstance(workers, bool):
            raise ConfigError(f"eval.cpu_workers={workers!r} is not allowed; allowed values: "
                              "auto, or an integer >= 1")
        _int("eval.cpu_workers", workers, 1)
    sc = cfg.scoring
    _allowed("scoring.source", sc.source, SCORE_SOURCES)
    _allowed("scoring.rank_by", sc.rank_by, RANK_BY)
    if sc.source == "file" and not sc.file:
        raise ConfigError("scoring.file is empty but scoring.source=file")
    for key in ("n_sequences", "seq_len", "batch_size"):
        _int(f"scoring.{key}", sc[key], 1)
    _int("scoring.repeats", sc.repeats, 2)
    _allowed("ablation.method", cfg.ablation.method, METHODS)
    _int("scan.n_stories", cfg.scan.n_stories, 1)
    _int("scan.heads_per_pass", cfg.scan.heads_per_pass, 1)
    if cfg.scan.layers is not None:
        for layer in cfg.scan.layers:
            _int("scan.layers[]", layer, 0)
    _int("ablation.n_reference", cfg.ablation.n_reference, 1)


def semantic_config(cfg: DictConfig) -> dict:
    """The resolved config minus Hydra's node and keys that do not change results."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    for dotted in NON_SEMANTIC:
        node = container
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.get(p, {})
        if isinstance(node, dict):
            node.pop(leaf, None)
    return container


def config_hash(cfg: DictConfig) -> str:
    blob = json.dumps(semantic_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

"""What names a job: the semantic config (what determines its results), its hash, the speed
keys left out of both, and job folder names.

A field marked ``metadata=SPEED`` in :mod:`ih_sweep.config.schema` changes how fast or where a
job runs, not what it computes: :func:`speed_keys` lists them, :func:`semantic_config` drops
them, and Hydra's ``override_dirname.exclude_keys`` is :func:`speed_keys` (through the
``ih_sweep.speed_keys`` resolver, :func:`ih_sweep.config.hydra.register`). Importing this
module imports neither torch nor any other stage of the package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from omegaconf import DictConfig, open_dict

from ih_sweep.config.plain import plain
from ih_sweep.config.schema import (
    EXCLUSION_KEYS,
    FV_KEYS,
    NO_REFERENCE_METHODS,
    Config,
    schema_fields,
)

MAX_FOLDER_BYTES = 200  # file systems allow 255 bytes a name; room for Hydra's own suffixes


def folder_name(overrides: str) -> str:
    """A job folder's name from its ``override_dirname``: no ``/`` (a hub id or a path must
    not nest folders), and at most :data:`MAX_FOLDER_BYTES` bytes: a longer name keeps its
    start and ends in ``~`` and 12 hex digits of the full name's sha256 (the full overrides
    are in the folder's ``.hydra/overrides.yaml``)."""
    name = str(overrides).replace("/", "_") or "default"
    raw = name.encode()
    if len(raw) <= MAX_FOLDER_BYTES:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:12]
    head = raw[:MAX_FOLDER_BYTES - 13].decode(errors="ignore")
    return f"{head}~{digest}"


# --------------------------------------------------------------------------- speed fields
def _speed_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, (f, node) in schema_fields(cls).items():
        dotted = prefix + name
        if f.metadata.get("semantic", True) is False:  # a whole group: every leaf key
            keys += [f"{dotted}.{leaf}" for leaf in schema_fields(node)] if node else [dotted]
        elif node:
            keys += _speed_keys(node, dotted + ".")
    return keys


def speed_keys() -> list[str]:
    """Dotted keys that change no result (``metadata=SPEED``), leaves only."""
    return _speed_keys(Config)


# --------------------------------------------------------------------------- hashing
def without_hydra(cfg: DictConfig) -> DictConfig:
    """``cfg`` without Hydra's own node (``compose(return_hydra_config=True)`` keeps it)."""
    if "hydra" not in cfg:
        return cfg
    node = cfg.copy()
    with open_dict(node):
        node.pop("hydra")
    return node


def _semantic(node: Any) -> dict:
    container = plain(node if dataclasses.is_dataclass(node) else without_hydra(node))
    assert isinstance(container, dict)
    return container


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def semantic_config(cfg: DictConfig | Config) -> dict:
    """What determines a job's results, as plain data: the resolved config minus Hydra's
    node, every speed key, and the settings that cannot matter for this job: the control
    seed of a condition other than ``random``, ``control_seeds`` unless a random job asks
    for several draws (so each draw of such a job hashes as its single-seed job),
    ``control`` unless a random job matches on more than layers
    (``control.match=layer_norm``; so every other job hashes as before it existed),
    ``ablation.reference`` for zero ablation and both reference keys where they say
    ``evaluated`` (in-sample references hash as before held-out ones existed), and for
    an unablated job (``condition=none`` or ``n_heads=0``) which heads would have been
    chosen and how (``n_heads`` becomes 0, ``scoring`` and ``ablation`` go). Two jobs with
    the same semantic config compute the same results."""
    container = _semantic(cfg)
    if container.get("condition") != "random":
        container.pop("control_seed", None)
    if container.get("condition") == "none" or container.get("n_heads") == 0:
        container.update(n_heads=0, condition="none")
        container.pop("scoring", None)
        container.pop("ablation", None)
    _drop_unused_scoring(container.get("scoring"))
    if container.get("condition") != "random" or container.get("control_seeds") == 1:
        container.pop("control_seeds", None)  # one draw: the single-seed job's hash
    control = container.get("control")
    if container.get("condition") != "random" or not isinstance(control, dict) or \
            control.get("match") == "layer":
        container.pop("control", None)  # today's layer-matched draw: the hash it had before
    ablation = container.get("ablation")
    if isinstance(ablation, dict) and ablation.get("method") != "resample":
        ablation.pop("seed", None)  # only resample draws anything
    if isinstance(ablation, dict) and ablation.get("method") != "knockout":
        ablation.pop("knockout", None)  # only knockout reads it: other jobs hash as before
    if isinstance(ablation, dict) and (ablation.get("method") != "resample" or
                                       ablation.get("align") == "start"):
        ablation.pop("align", None)  # resample's absolute alignment: the hash it had before
    ev = container.get("eval")
    if isinstance(ev, dict) and (ev.get("format") != "helm" or ev.get("demo_lang") is None):
        ev.pop("demo_lang", None)  # only HELM's format picks a pool by it
    data = container.get("data")
    if isinstance(data, dict) and data.get("split") == "generated":
        data["split"] = "train"  # the generator's stories: the hash they had before the name
    mechanism = container.get("mechanism")
    if isinstance(mechanism, dict) and _icl_tokens(container) == "text":
        mechanism.pop("icl_tokens", None)  # the stories' own text: the hash it had before
    if isinstance(ablation, dict) and (ablation.get("method") in NO_REFERENCE_METHODS or
                                       ablation.get("reference") == "evaluated"):
        # zero (knockout) ablation takes no reference prompts; the evaluated ones: the hash
        # it had before held-out references existed
        ablation.pop("reference", None)
    for dotted in speed_keys():
        node = container
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.get(p, {})
        if isinstance(node, dict):
            node.pop(leaf, None)
    for group in ("paths", "train"):
        if not container.get(group):
            container.pop(group, None)
    if container.get("mechanism", {}).get("enabled") is False:  # its settings change nothing
        container["mechanism"] = {"enabled": False}
    return container


def _icl_tokens(container: dict) -> str:
    """``mechanism.icl_tokens`` as the job resolves it
    (:func:`ih_sweep.pipeline.mechanism.icl_tokens`: ``auto`` is answers for the bundled
    tiny model, text for any other)."""
    choice = str((container.get("mechanism") or {}).get("icl_tokens", "text"))
    if choice != "auto":
        return choice
    path = str((container.get("model") or {}).get("path", ""))
    return "answers" if path == "builtin:tiny" else "text"


def _drop_unused_scoring(scoring: Any) -> None:
    """Scoring settings that choose nothing leave the semantic config (so a job's hash is
    what it was before they existed): the exclusion's without ``exclude_by``, the FV
    settings where no ranking or exclusion uses the FV score."""
    if not isinstance(scoring, dict):
        return
    if scoring.get("exclude_by") is None:
        for key in EXCLUSION_KEYS:
            scoring.pop(key, None)
    if "fv" not in (scoring.get("rank_by"), scoring.get("exclude_by")):
        for key in FV_KEYS:
            scoring.pop(key, None)
    if scoring.get("fv_reference") == "evaluated":  # the hash it had before held-out FV
        scoring.pop("fv_reference", None)


def config_hash(cfg: DictConfig | Config) -> str:
    """16 hex digits naming what a job computes: the sha256 of its semantic config
    (:func:`semantic_config`) as JSON with sorted keys."""
    return _digest(semantic_config(cfg))[:16]

"""Hydra glue: the schema in Hydra's ConfigStore, the resolvers the YAML files use, and the
composed DictConfig turned into the typed, checked :class:`~ih_sweep.config.schema.Config`
(:func:`settings`), the one form every stage receives.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ih_sweep.config.errors import ConfigError
from ih_sweep.config.identity import folder_name, speed_keys, without_hydra
from ih_sweep.config.rules import check
from ih_sweep.config.schema import GROUPS, Config, schema_fields


def register() -> None:
    """Put the schema into Hydra's ConfigStore: ``base_config`` for the root and ``base`` in
    each group (the group's YAML files list it first in their defaults); the resolvers
    ``ih_sweep.speed_keys`` (:func:`~ih_sweep.config.identity.speed_keys`, Hydra's
    ``override_dirname.exclude_keys``), ``path_safe``
    (:func:`~ih_sweep.config.identity.folder_name`) and ``ih_sweep.unique``
    (:func:`unique_stamp`, the run and sweep folders' names)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, node in GROUPS.items():
        cs.store(group=group, name="base", node=node)
    if not OmegaConf.has_resolver("ih_sweep.speed_keys"):
        OmegaConf.register_new_resolver("ih_sweep.speed_keys", speed_keys)
    if not OmegaConf.has_resolver("path_safe"):
        OmegaConf.register_new_resolver("path_safe", folder_name)
    if not OmegaConf.has_resolver("ih_sweep.unique"):
        # cached: resolved once per command; Hydra copies the cache into each job's config
        # (load_sweep_config), also into submitit's jobs in other processes (pickled with it)
        OmegaConf.register_new_resolver("ih_sweep.unique", unique_stamp, use_cache=True)


def unique_stamp(stamp: str) -> str:
    """``stamp`` (``${now:...}``'s timestamp) with ``_`` and 6 random hex digits: two
    commands started in the same second get two folders (``hydra.run.dir``,
    ``hydra.sweep.dir``). Resolved once per command (the resolver is cached), so every job
    of a sweep, in this process or in submitit's, sees the same folder."""
    return f"{stamp}_{secrets.token_hex(3)}"


def original_cwd(cfg: DictConfig | None = None) -> Path:
    """The working directory the command started in: Hydra's ``hydra.runtime.cwd`` (from
    :class:`HydraConfig`, else ``cfg``'s hydra node), which a job with ``hydra.job.chdir=True``
    has left; the current directory outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        cwd = OmegaConf.select(HydraConfig.get(), "runtime.cwd", default=None)
        if cwd:
            return Path(cwd)
    if cfg is not None:
        cwd = OmegaConf.select(cfg, "hydra.runtime.cwd", default=None)
        if cwd:
            return Path(cwd)
    return Path(os.getcwd())


def absolute_paths(config: Config, base: Path) -> Config:
    """``config`` with every relative path it names resolved against ``base`` (the
    command's original working directory: :func:`original_cwd`), so that a job that runs
    in its own folder (``hydra.job.chdir=True``) reads and writes where the command meant:
    ``paths.cache_dir``, ``data.path``, ``scoring.file``, ``train.out_dir``, and
    ``model.path`` where it names a folder under ``base`` (a hub id stays as it is; the
    model's name, already resolved, is kept)."""
    def absolute(value: str) -> str:
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else base / path)

    config.paths = dataclasses.replace(config.paths, cache_dir=absolute(config.paths.cache_dir))
    config.train = dataclasses.replace(config.train, out_dir=absolute(config.train.out_dir))
    if config.data.path:
        config.data = dataclasses.replace(config.data, path=absolute(config.data.path))
    if config.scoring.file:
        config.scoring = dataclasses.replace(config.scoring, file=absolute(config.scoring.file))
    model_path = config.model.path
    if not model_path.startswith("builtin:") and not Path(model_path).expanduser(
            ).is_absolute() and (base / Path(model_path).expanduser()).exists():
        config.model = dataclasses.replace(config.model, path=absolute(model_path))
    return config


def _unknown_keys(node: DictConfig, cls: type, prefix: str = "") -> list[str]:
    """Keys in ``node`` that ``cls`` does not declare. Hydra's ``+key=value`` adds a key
    even to a typed node, and ``OmegaConf.to_object`` would then drop it silently."""
    declared = schema_fields(cls)
    unknown = []
    for key in node.keys():
        if str(key) not in declared:
            unknown.append(f"{prefix}{key}")
            continue
        child_cls = declared[str(key)][1]
        child = node._get_node(key)
        if child_cls is not None and isinstance(child, DictConfig) and not child._is_missing():
            unknown += _unknown_keys(child, child_cls, f"{prefix}{key}.")
    return unknown


def settings(cfg: DictConfig) -> Config:
    """The composed config (Hydra's node, if there, is left out) as the typed
    :class:`Config`, checked (:func:`~ih_sweep.config.rules.check`), its relative paths
    resolved against the command's original working directory (:func:`absolute_paths`).

    Raises :class:`ConfigError` for a missing mandatory value (e.g. ``model.path`` of
    ``model=hub``), a key the schema does not declare (``+key=value``) or a broken rule."""
    if cfg.get("model") is None or not isinstance(cfg.model, DictConfig):
        raise ConfigError("model is missing; choose one, e.g. model=tiny or model=hub "
                          "model.path=EleutherAI/pythia-160m")
    if OmegaConf.is_missing(cfg.model, "path"):
        raise ConfigError("model.path is missing; give a hub id or a local folder, e.g. "
                          "model.path=EleutherAI/pythia-160m")
    node = without_hydra(cfg)
    unknown = _unknown_keys(node, Config)
    if unknown:
        key = unknown[0]
        parent = key.rpartition(".")[0]
        cls = Config
        for part in filter(None, parent.split(".")):
            cls = schema_fields(cls)[part][1]
        known = ", ".join(schema_fields(cls))
        raise ConfigError(f"{key}={OmegaConf.select(node, key)!r} is not a config key; keys of "
                          f"{parent or 'the top level'}: {known}")
    typed = OmegaConf.to_object(node)
    assert isinstance(typed, Config), type(typed)
    check(typed)
    return absolute_paths(typed, original_cwd(cfg))

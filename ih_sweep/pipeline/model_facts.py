"""What the checks before any job found about a local model folder, kept in the score
cache across commands (:class:`ModelFacts`), so that a command whose model folder is
unchanged answers those checks (:mod:`ih_sweep.pipeline.preflight`) without importing torch
or transformers: a full-reuse rerun of a sweep then needs neither."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ih_sweep.config.schema import Config

log = logging.getLogger(__name__)


FACTS_VERSION = 1  # raise when a check that facts stand for changes what it finds


class ModelFacts:
    """What the checks before any job found about one local model folder (its files whole
    and fitting config.json, its pad token; its layers and heads; its position limit; its
    tokenizer's BOS and candidate tokens), kept in ``<paths.cache_dir>/checks/<key>.json``
    where ``key`` is the sha256 of the folder's path, every file in it by content
    (:func:`ih_sweep.fingerprints.file_fingerprint`), the model's revision and
    ``trust_remote_code``, and the versions of ih_sweep and transformers (the code that
    checks). A later command that finds the same files answers those checks from the
    record without importing torch or transformers; a changed, added or removed file
    gives another key, so the folder is checked again. Only what passed is kept: a
    refusal is found afresh each time. Records found in this process wait in memory until
    :func:`keep_facts` (every job's checks passed), so a refused command writes
    nothing into the cache."""

    def __init__(self, file: Path | None, facts: dict[str, Any]):
        self.file = file
        self.facts = facts
        self.changed = False

    def get(self, name: str, compute: Callable[[], Any]) -> Any:
        """The fact ``name``, from the record or else ``compute()`` (which raises a
        :class:`~ih_sweep.config.errors.UserError` for a refusal: nothing is kept then)."""
        if name not in self.facts:
            self.facts[name] = compute()
            self.changed = True
        return self.facts[name]


_FACTS: dict[tuple[str, str], ModelFacts] = {}  # (cache folder, key) -> the record
_FOLDER_KEYS: dict[str, str] = {}  # folder stamp (names, sizes, mtimes) -> its key


def _versions() -> dict[str, str]:
    """The versions of the code that checks a model folder (no import of transformers)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("ih_sweep", "transformers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "none"
    return out


def _folder_key(folder: Path, model: Any) -> str:
    """The record's key of a local model folder (see :class:`ModelFacts`); the files'
    contents are read once per process for each state (names, sizes, modification times)
    of the folder."""
    from ih_sweep.fingerprints import file_fingerprint
    from ih_sweep.model.loading import folder_stamp

    stamp = folder_stamp(folder) + json.dumps(
        [model.revision, bool(model.trust_remote_code)])
    if stamp not in _FOLDER_KEYS:
        files = {e.name: file_fingerprint(e) for e in sorted(folder.iterdir()) if e.is_file()}
        identity = {"version": FACTS_VERSION, "folder": str(folder.resolve()),
                    "files": files, "revision": model.revision,
                    "trust_remote_code": bool(model.trust_remote_code), **_versions()}
        _FOLDER_KEYS[stamp] = hashlib.sha256(
            json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return _FOLDER_KEYS[stamp]


def model_facts(config: Config) -> ModelFacts | None:
    """The :class:`ModelFacts` of the job's model when ``model.path`` is a local folder
    (the built-in model's too); None for a hub id (its files come when the job loads it)."""
    from ih_sweep.model.loading import resolve_path

    path = Path(resolve_path(config.model.path))
    if not path.is_dir():
        return None
    key = _folder_key(path, config.model)
    cache = str(Path(config.paths.cache_dir).expanduser())
    if (cache, key) not in _FACTS:
        file = Path(cache) / "checks" / f"{key}.json"
        try:
            facts = json.loads(file.read_text(encoding="utf-8"))
            if not isinstance(facts, dict):
                facts = {}
        except (OSError, ValueError):
            facts = {}
        _FACTS[(cache, key)] = ModelFacts(file, facts)
    return _FACTS[(cache, key)]


def keep_facts() -> None:
    """Write the records of :class:`ModelFacts` that gained facts in this process into
    their cache folders (called once every job's checks passed). A cache folder that
    cannot be written keeps nothing: the checks then run again next time."""
    from ih_sweep.io_utils import write_json

    for facts in _FACTS.values():
        if facts.changed and facts.file is not None:
            try:
                write_json(facts.file, facts.facts)
                facts.changed = False
            except OSError as err:
                log.debug("could not keep the model checks in %s: %s", facts.file, err)


def forget_facts() -> None:
    """Drop the records read or found in this process (tests; a new command)."""
    _FACTS.clear()
    _FOLDER_KEYS.clear()

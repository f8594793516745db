"""What a job's inputs hold, by content: a fingerprint of each file that determines its
results (the bAbI files it reads, the score file it ranks heads by, a local model folder's
weights, config, tokenizer and generation config), so that a job store or cache keyed by
names also notices a file rewritten at the same path, or a symlink re-pointed.

A file's fingerprint is exact where it is small (its full sha256, below
:data:`EXACT_BYTES`) and cheap where it is big: its size and the sha256 of its first and last
MiB, of :data:`SAMPLES` blocks spread evenly between them and, for a safetensors file, of its
whole header (the tensors' names, dtypes, shapes and offsets). Paths are resolved through
symlinks before they are read. The built-in model and the hub's models are not files here:
they keep their names (and revisions) as their identity.

Each function is a pure function of the files (and the config naming them); importing this
module imports neither torch nor transformers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

EXACT_BYTES = 8 << 20  # files below this size: their full sha256
EDGE_BYTES = 1 << 20  # bigger ones: the first and last MiB ...
SAMPLES = 8  # ... and this many blocks between them ...
SAMPLE_BYTES = 64 << 10  # ... of this size each
MISSING = "missing"

# a local model folder: the files that make its weights, its tokenizer and its generation
MODEL_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.json", "*.txt",
               "*.model", "*.tiktoken", "*.py", "*.jinja")


def file_fingerprint(path: str | Path) -> str:
    """``sha256:<hex>`` of a small file's content; ``sampled:<size>:<hex>`` for a big one
    (see the module); :data:`MISSING` when there is no such file."""
    path = Path(path).resolve()
    if not path.is_file():
        return MISSING
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if size < EXACT_BYTES:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
            return f"sha256:{digest.hexdigest()}"
        step = (size - 2 * EDGE_BYTES) // (SAMPLES + 1)
        spans = [(0, EDGE_BYTES)] + [(EDGE_BYTES + k * step, SAMPLE_BYTES)
                                     for k in range(1, SAMPLES + 1)]
        spans.append((size - EDGE_BYTES, EDGE_BYTES))
        if path.suffix == ".safetensors":
            header = int.from_bytes(fh.read(8), "little")
            spans.append((0, 8 + min(header, size - 8)))
        for start, length in spans:
            fh.seek(start)
            digest.update(fh.read(length))
    return f"sampled:{size}:{digest.hexdigest()}"


def folder_fingerprint(folder: str | Path, patterns: tuple[str, ...] = MODEL_FILES
                       ) -> dict[str, str]:
    """{file name: :func:`file_fingerprint`} of the files directly in ``folder`` (resolved
    through symlinks) that match ``patterns``."""
    folder = Path(folder).resolve()
    files = sorted({f for pattern in patterns for f in folder.glob(pattern) if f.is_file()})
    return {f.name: file_fingerprint(f) for f in files}


def local_model_folder(model_path: str) -> Path | None:
    """The folder a ``model.path`` names when it is a local folder (symlinks resolved);
    None for the built-in model and for a hub id."""
    from ih_sweep.model.loading import BUILTIN_PREFIX

    if model_path.startswith(BUILTIN_PREFIX):
        return None
    local = Path(model_path).expanduser()
    return local.resolve() if local.is_dir() else None


def model_inputs(model_path: str) -> dict[str, str]:
    """``{"model/<file>": fingerprint}`` of a local model folder's files
    (:data:`MODEL_FILES`); empty for the built-in model and a hub id (their name and
    revision, in the config hash, name them)."""
    folder = local_model_folder(model_path)
    if folder is None:
        return {}
    return {f"model/{name}": fp for name, fp in folder_fingerprint(folder).items()}


def data_inputs(config: Any) -> dict[str, str]:
    """``{"data/<file>": fingerprint}`` of the bAbI files the job's items are read from
    (``data=babi_files``: the evaluated task file and, for a prompt format with demos,
    the train file they are drawn from; :mod:`ih_sweep.data.sources`); empty for generated
    and hub data. A file that is not there is :data:`MISSING` (the job then fails on it)."""
    from ih_sweep.config.schema import DataSource, PromptFormat
    from ih_sweep.data.sources import DataError, babi_file

    data, ev = config.data, config.eval
    if data.name != DataSource.babi_files or not data.path:
        return {}
    splits = [getattr(data.split, "value", str(data.split))]
    if ev.format != PromptFormat.notebook and ev.n_shots:
        splits.append("train")
    root = Path(data.path).expanduser()
    out = {}
    for split in dict.fromkeys(splits):
        try:
            path = babi_file(root, data.lang, data.task, split)
        except DataError:
            out[f"data/{data.lang}/qa{data.task}_{split}"] = MISSING
            continue
        out[f"data/{data.lang}/{path.name}"] = file_fingerprint(path)
    return out


def score_inputs(config: Any) -> dict[str, str]:
    """``{"scores/<file name>": fingerprint}`` of ``scoring.file`` where the job ranks heads
    by it (``scoring.source=file`` and heads ablated); empty otherwise."""
    from ih_sweep.config.identity import semantic_config

    scoring = semantic_config(config).get("scoring")
    if not isinstance(scoring, dict) or scoring.get("source") != "file" or \
            not scoring.get("file"):
        return {}
    path = Path(scoring["file"]).expanduser()
    return {f"scores/{path.name}": file_fingerprint(path)}


def job_inputs(config: Any) -> dict[str, str]:
    """Every input file that determines an evaluate job's results, by content
    (:func:`data_inputs`, :func:`score_inputs`, :func:`model_inputs`); empty for the
    built-in model on generated data. Recorded in job.json beside the config hash and
    compared before a finished job is reused."""
    return {**data_inputs(config), **score_inputs(config), **model_inputs(config.model.path)}


def changed_inputs(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The inputs whose fingerprint differs between a record and now (added, removed or
    changed), sorted."""
    return sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))

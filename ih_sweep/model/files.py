"""Checks on a local model folder's files before any job runs (issue 29): every file the
load reads can be read, the weights files are whole (a safetensors file's header and the
tensors' byte ranges; a ``pytorch_model.bin``'s zip directory), and ``config.json`` fits the
weights (its layer count and every tensor shape, from the safetensors headers: no weights
are read). Each mistake raises :class:`ModelFileError`, one line naming the file.

Which weights transformers loads from a folder, in its order: ``model.safetensors``, the
shards of ``model.safetensors.index.json``, ``pytorch_model.bin``, the shards of
``pytorch_model.bin.index.json`` (:func:`weights_files`).
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from pathlib import Path

from ih_sweep.config.errors import UserError

SAFE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on its JSON header (bytes)
# bytes per element of the safetensors dtypes
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
              "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# the weight whose rows are the query heads (heads x head_dim), by the name's ending
QUERY_WEIGHTS = ("q_proj.weight", "self_attn.q_proj.weight", "attention.wq.weight")
_LAYER = re.compile(r"^(.*?)\.(\d+)\.")  # "model.layers.3.mlp..." -> ("model.layers", 3)

Header = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (dtype, shape)


class ModelFileError(UserError):
    """A model folder's file that cannot be read, is damaged, or does not fit
    ``config.json``."""

    kind = "model"


def check_readable(path: Path) -> None:
    """``path`` (a file, or a folder: it and every file directly in it) can be opened for
    reading by this process; raises :class:`ModelFileError` naming the first that cannot
    ("not readable (permission denied)"). Opening, not ``os.access``: what counts is what
    this process may do (root reads everything whatever the mode bits)."""
    try:
        entries = sorted(path.iterdir()) if path.is_dir() else [path]
    except PermissionError:
        raise ModelFileError(f"{path}: not readable (permission denied); give this user "
                             f"read and execute permission on the folder (chmod a+rx)") from None
    for entry in entries:
        if not entry.is_file():
            continue
        try:
            with open(entry, "rb"):
                pass
        except PermissionError:
            raise ModelFileError(f"{entry}: not readable (permission denied); give this "
                                 "user read permission on it (chmod a+r)") from None


def weights_files(folder: Path) -> list[Path]:
    """The weights files transformers loads from ``folder``, in its order of preference
    (a single file, or the shards an index names); empty when it holds none. Raises
    :class:`ModelFileError` for an index that is not JSON or names a missing shard."""
    for single, index in ((SAFE, SAFE_INDEX), (BIN, BIN_INDEX)):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
                shards = sorted({folder / name for name in weight_map.values()})
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ModelFileError(f"{folder / index}: not a weights index (JSON with a "
                                     "weight_map of tensor -> shard file)") from None
            for shard in shards:
                if not shard.is_file():
                    raise ModelFileError(f"{folder / index}: names the shard {shard.name}, "
                                         "which the folder does not hold")
            return shards
    return []


def safetensors_header(path: Path) -> Header:
    """The tensors of a safetensors file, from its header alone: ``{name: (dtype,
    shape)}``. The file is 8 bytes (little-endian header length N), N bytes of JSON, then
    the data; every tensor's ``data_offsets`` must lie within the data and span its
    shape's bytes. Raises :class:`ModelFileError` naming the file and what is wrong."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise ModelFileError(f"{path}: not a safetensors file: {size} bytes, fewer than "
                                 "the 8 of its header length (empty or truncated); save or "
                                 "download the weights again")
        n = int.from_bytes(first, "little")
        if n > min(size - 8, MAX_HEADER):
            raise ModelFileError(f"{path}: not a safetensors file: its first 8 bytes give a "
                                 f"header of {n} bytes, the file has {size - 8} after them "
                                 "(truncated, or not safetensors); save or download the "
                                 "weights again")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except ValueError:  # also UnicodeDecodeError
        raise ModelFileError(f"{path}: not a safetensors file: its header is not a JSON "
                             "object (damaged, or not safetensors); save or download the "
                             "weights again") from None
    data = size - 8 - n
    tensors: Header = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(info["dtype"]), tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{path}: damaged safetensors header: tensor {name} has no "
                                 "valid dtype, shape and data_offsets") from None
        if not 0 <= begin <= end <= data:
            raise ModelFileError(f"{path}: truncated or damaged: tensor {name} lies at bytes "
                                 f"{begin}-{end} of the data, but the file holds {data} bytes "
                                 "of data; save or download the weights again")
        width = ITEM_BYTES.get(dtype)
        if width is not None and end - begin != math.prod(shape) * width:
            raise ModelFileError(f"{path}: damaged safetensors header: tensor {name} "
                                 f"({dtype} {list(shape)}) spans {end - begin} bytes, not "
                                 f"{math.prod(shape) * width}")
        tensors[name] = (dtype, shape)
    return tensors


def check_torch_file(path: Path) -> None:
    """A ``pytorch_model.bin`` is a whole PyTorch file: a zip archive with its directory
    (the end of the file) and a ``data.pkl``, or the older format, a pickle stream (first
    byte 0x80). Raises :class:`ModelFileError` naming the file. Only the directory is read,
    not the tensors (transformers itself refuses unsafe pickles)."""
    size = path.stat().st_size
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            names = []
        if any(name.endswith("data.pkl") for name in names):
            return
        raise ModelFileError(f"{path}: damaged PyTorch file: a zip archive without its "
                             "data.pkl; save or download the weights again")
    with open(path, "rb") as f:
        first = f.read(2)
    if size == 0 or first[:1] != b"\x80":
        raise ModelFileError(f"{path}: not a PyTorch file ({size} bytes; neither a zip archive "
                             "nor a pickle: empty, truncated or another format); save or "
                             "download the weights again")


def headers(folder: Path) -> dict[Path, Header]:
    """Each weights file of ``folder`` checked (:func:`safetensors_header`,
    :func:`check_torch_file`), with its tensors for safetensors files (empty for .bin:
    their tensor names are in the pickle, not read here). Raises :class:`ModelFileError`
    for a folder without weights or a damaged file."""
    files = weights_files(folder)
    if not files:
        raise ModelFileError(f"model.path={folder}: the folder does not hold its weights "
                             f"({SAFE}, {SAFE_INDEX}, {BIN} or {BIN_INDEX}); give a folder "
                             "as save_pretrained writes it")
    out: dict[Path, Header] = {}
    for file in files:
        if file.suffix == ".safetensors":
            out[file] = safetensors_header(file)
        else:
            check_torch_file(file)
            out[file] = {}
    return out


def layer_key(config) -> tuple[str, int] | None:
    """(the config.json key, its value) that gives the layer count, under the family's
    name (``num_hidden_layers``, ``n_layer``, ``num_layers``); None when none is set."""
    from ih_sweep.model.shape import text_config

    text = text_config(config)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(text, name, None) is not None:
            return name, int(getattr(text, name))
    return None


def layer_indices(names) -> dict[str, set[int]]:
    """``{stem: layer indices}`` of tensor names: ``model.layers.3.mlp.up.weight`` ->
    ``{"model.layers": {3}}`` (the first numbered component of each name)."""
    out: dict[str, set[int]] = {}
    for name in names:
        match = _LAYER.match(name)
        if match:
            out.setdefault(match.group(1), set()).add(int(match.group(2)))
    return out


def _same_stem(a: str, b: str) -> bool:
    """Stems that name the same list of layers, a base-model prefix aside
    (``model.layers`` and ``layers``)."""
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def expected_shapes(config, trust_remote_code: bool = False) -> dict[str, tuple[int, ...]]:
    """``{parameter name: shape}`` of the model ``config`` builds, made on PyTorch's meta
    device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                 attn_implementation="eager")
    return {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}


def check_fits(config, config_file: Path, tensors: dict[str, tuple[Path, tuple[int, ...]]],
               expected: dict[str, tuple[int, ...]]) -> None:
    """``config.json`` (``config``) against the weights' tensors (``{name: (file, shape)}``)
    and the parameters its model has (``expected``: :func:`expected_shapes`): as many layers
    as the weights hold, and every tensor both name of the same shape (a base-model prefix
    aside). Raises :class:`ModelFileError` naming config.json, the key and what the weights
    hold."""
    key = layer_key(config)
    if key is not None:
        want = layer_indices(expected)
        have = layer_indices(tensors)
        for stem, indices in want.items():
            held = next((have[s] for s in have if _same_stem(stem, s)), None)
            if held is None or len(indices) != key[1]:
                continue
            if len(held) != key[1]:
                files = sorted({tensors[n][0].name for n in tensors
                                if n.startswith(next(s for s in have if _same_stem(stem, s)))})
                raise ModelFileError(
                    f"{config_file}: {key[0]}={key[1]}, but the weights ({', '.join(files)}) "
                    f"hold {len(held)} layer(s) (indices {min(held)}-{max(held)}); "
                    + ("transformers would fill the missing layers with random weights"
                       if key[1] > len(held) else "the extra layers would be left out")
                    + f"; set {key[0]}={len(held)} or use the weights it was saved with")
    for name, shape in expected.items():
        found = tensors.get(name)
        if found is None and "." in name:
            found = tensors.get(name.split(".", 1)[1])  # a base model's checkpoint
        if found is None or tuple(found[1]) == shape:
            continue
        file, held = found
        if name.endswith(QUERY_WEIGHTS) and held and shape and held[1:] == shape[1:]:
            heads = int(getattr(_text(config), "num_attention_heads", 0) or 0)
            head_dim = shape[0] // heads if heads else 0
            if head_dim and held[0] % head_dim == 0:
                raise ModelFileError(
                    f"{config_file}: num_attention_heads={heads} does not fit the weights: "
                    f"{file.name} holds {name} of shape {list(held)}, {held[0] // head_dim} "
                    f"heads of head_dim {head_dim} (the config's {heads} heads give "
                    f"{list(shape)}); set num_attention_heads={held[0] // head_dim}")
        raise ModelFileError(f"{config_file}: does not fit the weights: {file.name} holds "
                             f"{name} of shape {list(held)}, the config's model has "
                             f"{list(shape)}; use the config.json the weights were saved with")


def _text(config):
    from ih_sweep.model.shape import text_config

    return text_config(config)


_CHECKED: dict[tuple, None] = {}  # folders that passed, by their files' (name, size, mtime)


def check_model_folder(folder: Path, config, trust_remote_code: bool = False) -> None:
    """Every check of this module on a local model folder holding ``config`` (its parsed
    config.json): readable, whole weights files, config.json fitting them. A pre-quantized
    checkpoint (``quantization_config`` in config.json: packed shapes) gets the first two.
    Remembered per process by the files' names, sizes and modification times. Raises
    :class:`ModelFileError`."""
    check_readable(folder)
    stamp = (str(folder.resolve()), tuple(
        (e.name, s.st_size, s.st_mtime_ns) for e in sorted(folder.iterdir())
        if e.is_file() and (s := e.stat())), config.to_json_string())
    if stamp in _CHECKED:
        return
    found = headers(folder)
    tensors = {name: (file, shape) for file, header in found.items()
               for name, (_, shape) in header.items()}
    if tensors and getattr(config, "quantization_config", None) is None and \
            all(found.values()):
        check_fits(config, folder / "config.json", tensors,
                   expected_shapes(config, trust_remote_code))
    _CHECKED[stamp] = None


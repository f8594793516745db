"""The checks a job's config gets before any job of a command runs: what needs the file
system or torch but no weights (the files and folders the config names, the device).

:func:`check_job` is what the CLI runs for a single job and what the launcher
(``hydra_plugins/ih_sweep_launcher``) runs for every job of a sweep before the first
starts, so that a mistake ends in one line with exit status 2 within seconds, not after
other jobs ran. Each check raises a :class:`~ih_sweep.config.errors.UserError` whose
message names the key, the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ih_sweep.config.errors import ConfigError, UserError
from ih_sweep.config.hydra import settings
from ih_sweep.config.schema import Config, Job, ScoreSource
from ih_sweep.pipeline.model_facts import ModelFacts, model_facts


class DeviceError(UserError):
    kind = "device"


def model_shape(config: Config) -> tuple[int, int]:
    """(layers, query heads per layer) of the job's model
    (:func:`ih_sweep.model.loading.layers_and_heads`), from the model folder's record
    where it has one."""
    from ih_sweep.model.loading import layers_and_heads

    facts = model_facts(config)
    if facts is None:
        return layers_and_heads(config.model)
    return tuple(facts.get("layers_and_heads",  # type: ignore[return-value]
                           lambda: list(layers_and_heads(config.model))))


def check_score_file(config: Config) -> None:
    """``scoring.source=file`` names a file that exists."""
    if config.scoring.source == ScoreSource.file and not Path(config.scoring.file).is_file():
        raise ConfigError(f"scoring.file={config.scoring.file}: no such score file")


def check_data_files(config: Config) -> None:
    """``data=babi_files``: the task file of ``data.lang``/``task``/``split`` (and, for a
    prompt format with demonstrations, the train file they come from) exists, is readable
    and parses as bAbI (:func:`ih_sweep.data.sources.check_babi_files`); ``data=babi_hub``:
    the hub answers (:func:`ih_sweep.data.sources.check_babi_hub`). Raises
    :class:`~ih_sweep.data.sources.DataError`."""
    from ih_sweep.config.schema import PromptFormat
    from ih_sweep.data.prompts import demo_lang
    from ih_sweep.data.sources import check_babi_files, check_babi_hub

    demos = config.eval.format != PromptFormat.notebook and config.eval.n_shots > 0
    check_babi_files(config.data, demo_lang(config.data, config.eval) if demos else None)
    check_babi_hub(config.data)


# (file, size, mtime) -> the table read from it and found good
_SCORE_TABLES: dict[tuple[str, int, int], object] = {}


def _score_table(path: Path):
    """The score table of ``path`` (:func:`ih_sweep.heads.scoring.load_score_file`), read
    once per process for each size and modification time of the file."""
    from ih_sweep.heads.scoring import load_score_file

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SCORE_TABLES:
        _SCORE_TABLES[key] = load_score_file(path)
    return _SCORE_TABLES[key]


def check_score_table_file(config: Config) -> None:
    """``scoring.source=file``: the file exists, can be read (not a folder, a named pipe,
    a loop of links, a permission refused: :func:`ih_sweep.data.files.unreadable`), has the
    suffix of a table (.csv) or the notebook's pickle (.pkl/.pickle) and reads as a score
    table (:func:`_score_table`). Raises :class:`~ih_sweep.heads.scoring.ScoreFileError`."""
    if config.scoring.source != ScoreSource.file or not config.scoring.file:
        return
    from ih_sweep.data.files import unreadable
    from ih_sweep.heads.scoring import ScoreFileError

    path = Path(config.scoring.file).expanduser()
    problem = unreadable(path)
    if problem is not None:
        if problem.startswith("no such file"):
            problem = problem.replace("no such file", "no such score file", 1)
        raise ScoreFileError(f"scoring.file={path}: {problem}")
    _score_table(path)


def check_score_table_fits(config: Config) -> None:
    """``scoring.source=file`` for a job that chooses heads with it: the table's layers and
    heads are the model's (:func:`ih_sweep.heads.score_table.check_scores_fit`, the model's
    shape from config.json, no weights), so that the score file of another model is
    refused before any job runs (the job checks it again). Raises
    :class:`~ih_sweep.heads.scoring.ScoreFileError`."""
    from ih_sweep.config.schema import Condition

    if config.scoring.source != ScoreSource.file or not config.scoring.file or \
            config.job != Job.evaluate or config.condition == Condition.none:
        return
    from ih_sweep.heads.score_table import check_scores_fit

    n_layers, heads_per_layer = model_shape(config)
    check_scores_fit(_score_table(Path(config.scoring.file).expanduser()), n_layers,
                     heads_per_layer, config.scoring.file)


def check_model_path(config: Config) -> None:
    """A local model folder takes no ``model.revision``."""
    from ih_sweep.model.loading import resolve_path

    if Path(resolve_path(config.model.path)).is_dir() and config.model.revision:
        raise ConfigError(f"model.revision={config.model.revision}: model.path="
                          f"{config.model.path} is a local folder, which has no revisions; "
                          "a revision applies to hub ids only")


def check_train_out(config: Config) -> None:
    """``job=train_tiny`` writes into a new folder or replaces a tiny model's."""
    if config.job != Job.train_tiny:
        return
    out = Path(config.train.out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (
            out / "training.json").is_file())):
        raise ConfigError(f"train.out_dir={config.train.out_dir}: "
                          + ("is a file" if not out.is_dir() else
                             "is a folder with other files in it (no tiny model)")
                          + "; give a new folder, or the folder of a tiny model to "
                            "replace")


def _cuda_count_short_of(spec: str) -> int | None:
    """torch's count of CUDA devices here when ``spec`` (``cuda`` or ``cuda:N``) names one
    beyond them, else None."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(spec.split(":")[1]) if ":" in spec else 0
    return count if index >= count else None


def check_device(config: Config) -> None:
    """``device`` names a device torch has here."""
    device = config.device
    if not (device.startswith("cuda") or device == "mps"):
        return
    import torch

    if device == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device=mps: no Apple GPU (MPS) is available to torch here; "
                          "use device=cpu or device=auto")
    count = _cuda_count_short_of(device) if device.startswith("cuda") else None
    if count is not None:
        raise DeviceError(f"device={device}: torch sees {count} CUDA device(s) here "
                          f"(torch {torch.__version__}); use device=cpu or device=auto")


def check_device_map(config: Config) -> None:
    """``model.device_map=cuda`` / ``cuda:N`` names a CUDA device torch has here (as
    ``device`` must: :func:`check_device`)."""
    dm = config.model.device_map
    if dm is None or not str(dm).startswith("cuda"):
        return
    import torch

    count = _cuda_count_short_of(str(dm))
    if count is not None:
        raise DeviceError(f"model.device_map={dm}: torch sees {count} CUDA device(s) here "
                          f"(torch {torch.__version__}); use model.device_map=null with "
                          "device=cpu or device=auto")


def check_model_files(config: Config) -> None:
    """A local model folder's files (:func:`ih_sweep.model.loading.check_local_model`):
    readable, whole weights (safetensors headers, .bin directories), config.json fitting
    the weights, a pad token from the tokenizer or the model's config; no weights read."""
    if config.job == Job.train_tiny:
        return
    from ih_sweep.model.loading import check_local_model

    facts = model_facts(config)
    if facts is None:
        check_local_model(config.model)
        return
    facts.get("files_checked", lambda: check_local_model(config.model) or True)


def check_attention(config: Config) -> None:
    """``model.attn_implementation`` that cannot run here (flash attention 2 without its
    package or GPU, flex attention without a CUDA GPU) falls back to sdpa (or eager) with
    one log line, decided here, before any job runs; the job's load chooses the same
    (:func:`ih_sweep.model.loading.attention_choice`)."""
    if config.job == Job.train_tiny or \
            str(config.model.attn_implementation) in ("sdpa", "eager"):
        return
    from ih_sweep.model.loading import attention_choice

    attention_choice(config.model, config.device)


def check_head_count(config: Config) -> None:
    """``n_heads`` fits the model's heads (:func:`ih_sweep.pipeline.stages.count_heads`,
    from config.json alone), so that ``n_heads=65`` on a 64-head model is refused before
    any job of a sweep runs, not inside one."""
    from ih_sweep.config.schema import Condition

    if config.job != Job.evaluate or config.condition == Condition.none:
        return
    from ih_sweep.pipeline.stages import count_heads

    count_heads(config, model_shape(config))


def check_random_sequences(config: Config) -> None:
    """The repeated random sequences the job will draw fit the model: scoring's (for the
    score table: ``job=score``/``scan``, and ``job=evaluate`` choosing heads by computed
    scores) and the mechanism check's (``job=evaluate`` with ``mechanism.enabled``).
    ``[BOS] + seq_len x repeats`` tokens must fit the model's positions (config.json), and
    a local model's tokenizer must offer ``seq_len`` candidate tokens after the
    ``exclude_*_frac`` cuts (:func:`ih_sweep.heads.scoring.candidate_token_ids`; a hub
    model's tokenizer is checked when its job loads it). The same checks run again inside
    the job. Raises :class:`~ih_sweep.config.errors.ConfigError` naming the key."""
    from ih_sweep.config.schema import Condition

    uses: list[tuple[str, object]] = []
    if config.job in (Job.score, Job.scan) or (
            config.job == Job.evaluate and config.condition != Condition.none
            and config.scoring.source == ScoreSource.compute):
        uses.append(("scoring", config.scoring))
    if config.job == Job.evaluate and config.mechanism.enabled:
        uses.append(("mechanism", config.mechanism))
    if not uses:
        return
    from ih_sweep.heads.basics import check_repeated_sequences
    from ih_sweep.model.loading import resolve_path

    path = resolve_path(config.model.path)
    facts = model_facts(config)
    if facts is None:
        facts = ModelFacts(None, {})  # a hub id: found afresh, kept nowhere
    limit = facts.get("position_limit", lambda: _position_limit(config))
    local = Path(path).is_dir()
    bos = facts.get("bos", lambda: int(_tokenizer(config).bos_token_id is not None)) \
        if local else 1
    for key, s in uses:
        offered = facts.get(f"candidates:{s.exclude_frequent_frac!r}:"
                            f"{s.exclude_rare_frac!r}", lambda s=s: _candidates(config, s)) \
            if local else None
        check_repeated_sequences(key, s.seq_len, s.repeats, bos, limit, offered)


def _position_limit(config: Config) -> int | None:
    """How many positions the job's model allows (config.json)."""
    from ih_sweep.model.loading import load_config
    from ih_sweep.model.shape import position_limit

    return position_limit(load_config(config.model))


def _tokenizer(config: Config):
    """The local model folder's tokenizer, read for the checks."""
    from ih_sweep.model.loading import local_tokenizer, resolve_path

    return local_tokenizer(resolve_path(config.model.path), bool(config.model.trust_remote_code))


def _candidates(config: Config, settings: Any) -> int:
    """How many candidate tokens the local tokenizer offers after ``settings``'s
    ``exclude_*_frac`` cuts (:func:`ih_sweep.heads.scoring.candidate_token_ids`)."""
    from ih_sweep.heads.basics import candidate_token_ids

    return len(candidate_token_ids(_tokenizer(config), settings.exclude_frequent_frac,
                                   settings.exclude_rare_frac))


# in order; each takes the typed config and raises a UserError
CHECKS = [
    check_score_table_file,
    check_score_file,
    check_data_files,
    check_model_path,
    check_train_out,
    check_device,
    check_device_map,
    check_model_files,
    check_attention,
    check_head_count,
    check_score_table_fits,
    check_random_sequences,
]


def preflight(config: Config) -> None:
    """Every check of :data:`CHECKS`, in order; the first mistake raises."""
    for check in CHECKS:
        check(config)


def check_job(cfg: DictConfig) -> Config:
    """The typed config of one job, checked as far as it can be without a model's weights:
    the schema's rules and the files it names. Raises a
    :class:`~ih_sweep.config.errors.UserError`."""
    config = settings(cfg)
    preflight(config)
    return config

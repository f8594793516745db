"""The config schema: one typed dataclass per config group, the single source of truth.

The YAML files under ``conf/`` fill these in (defaults and docs); Hydra's ConfigStore holds
the dataclasses as each group's schema (``conf/<group>/*.yaml`` start from ``base``), so
OmegaConf rejects a wrong type, an unknown key or a value outside an Enum at compose time.
The few rules that span fields or ranges live here too (:func:`check`). Modules receive the
dataclasses themselves (:func:`settings`), never copies field by field, and take their
vocabularies (the Enums) from here. Importing this module imports neither torch nor any
other module of the package.

A field marked ``metadata=SPEED`` changes how fast or where a job runs, not what it computes:
those fields are left out of the config hash (:func:`config_hash`) and of the job folder
names (``hydra.job.config.override_dirname.exclude_keys`` is :func:`speed_keys`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from enum import Enum
from fractions import Fraction
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict


class UserError(ValueError):
    """A mistake in what the user gave (a config value, a file, a model path, a device):
    reported in one line, ``ih_sweep: <kind> error: <key or file>: <what is wrong>; <what is
    allowed or what to do>``, exit status 2. Anything else that fails is a bug."""

    kind = "input"


class ConfigError(UserError):
    """A config value that breaks a rule (see :func:`check`)."""

    kind = "config"


class Choice(str, Enum):
    """A closed vocabulary. Members equal, print and format as their value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Job(Choice):
    """What one Hydra job does."""

    evaluate = "evaluate"  # ablate one condition's heads and evaluate bAbI
    score = "score"  # the head score table alone
    scan = "scan"  # every head ablated on its own
    train_tiny = "train_tiny"  # retrain the bundled tiny model


class Condition(Choice):
    """Which heads are ablated (see :mod:`ih_sweep.heads.selection`)."""

    high = "high"  # the top-N heads by score (the induction heads)
    low = "low"  # the lowest-scoring heads, matched to ``high`` layer by layer
    random = "random"  # random heads, matched layer by layer, drawn with control_seed
    none = "none"  # no ablation


class DType(Choice):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Quantization(Choice):
    none = "none"
    nf4 = "nf4"  # bitsandbytes 4-bit NormalFloat
    int8 = "int8"  # bitsandbytes LLM.int8()


class AttnImplementation(Choice):
    """transformers' ``attn_implementation`` values (scoring switches to eager by itself)."""

    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"
    flex_attention = "flex_attention"


class DataSource(Choice):
    babi_generated = "babi_generated"  # the built-in generator of bAbI task 1
    babi_files = "babi_files"  # the release's text files
    babi_hub = "babi_hub"  # facebook/babi_qa on the Hugging Face hub


class Split(Choice):
    train = "train"
    valid = "valid"  # the en-valid / en-valid-10k folders' held-out part of train
    test = "test"


class Metric(Choice):
    """How a continuation is scored (:mod:`ih_sweep.evaluation.metrics` defines each)."""

    contains = "contains"  # the notebook's: every answer word is a word of the continuation
    exact = "exact"  # the first words are the answer's words
    quasi_exact = "quasi_exact"  # HELM's quasi_exact_match: equal after HELM's normalize_text
    verbatim = "verbatim"  # lm-eval's exact_match: equal character for character, no changes


class PromptFormat(Choice):
    """How a question is put to the model (:mod:`ih_sweep.data.babi` builds each)."""

    notebook = "notebook"  # the notebook's header and story, earlier answers shown
    helm = "helm"  # HELM babi_qa: Passage/Question/Answer blocks, fixed in-context demos
    lm_eval = "lm_eval"  # lm-evaluation-harness babi: the same blocks, demos per question


class Scope(Choice):
    last = "last"  # each story's final question (the notebook's)
    all = "all"  # every question


class ScoreSource(Choice):
    compute = "compute"
    file = "file"


class RankBy(Choice):
    prefix = "prefix"  # prefix matching (Olsson et al. 2022)
    copying = "copying"
    combined = "combined"  # the notebook's sqrt(prefix^2 + ((copying - 0.035) / 0.03)^2)
    fv = "fv"  # function-vector heads: average indirect effect (Todd et al. 2024), on the
    # job's own prompts (ih_sweep.heads.function_vectors)


class Schedule(Choice):
    cosine = "cosine"
    wsd = "wsd"  # warmup-stable-decay


FV_KEYS = ("fv_prompts", "fv_mean_prompts", "fv_seed", "fv_correct_only", "fv_batch_size")
EXCLUSION_KEYS = ("exclude_by", "exclude_share")
# bAbI v1.2 release folders; not an Enum because the names hold '-'
LANGS = ("en", "en-10k", "hn", "hn-10k", "shuffled", "shuffled-10k", "en-valid", "en-valid-10k")
BABI_TASKS = tuple(range(1, 21))
SPEED = {"semantic": False}  # field metadata: see the module docstring
MAX_STORIES = 1_000_000  # bAbI's largest split holds 10,000 stories


@dataclass
class ModelConfig:
    name: str = MISSING  # how the model is named in results and caches
    path: str = MISSING  # hub id, local folder, or builtin:tiny
    revision: str | None = None
    dtype: DType = DType.auto
    device_map: str | None = None
    trust_remote_code: bool = False
    attn_implementation: AttnImplementation = AttnImplementation.sdpa


@dataclass
class QuantizationConfig:
    name: Quantization = Quantization.none
    double_quant: bool = True  # nf4 only
    compute_dtype: DType = DType.bfloat16  # nf4 only


@dataclass
class DataConfig:
    name: DataSource = DataSource.babi_generated
    task: int = 1  # bAbI task number (1-20; the generator makes task 1)
    n_stories: int | None = 1000  # null: every story of the file
    seed: int = 0  # babi_generated: the generator's seed
    path: str | None = None  # babi_files: the release folder holding <lang>/ folders
    lang: str = "en-10k"  # babi_files, babi_hub: one of LANGS
    split: Split = Split.train  # babi_files, babi_hub


@dataclass
class EvalConfig:
    metric: Metric = Metric.contains
    scope: Scope = Scope.last
    max_new_tokens: int = 3
    format: PromptFormat = PromptFormat.notebook  # the prompt (ih_sweep.data.babi)
    n_shots: int = 0  # helm, lm_eval: answered demo questions before the asked one
    demo_seed: int = 0  # helm, lm_eval: seed of the demo draw (HELM: 0, lm-eval: 1234)
    # the continuation is cut at the first of these before it is scored ([]: never cut)
    stop: list[str] = field(default_factory=list)
    # rows a batch; auto: 32 on CPU, on CUDA what the free memory holds (ih_sweep.model.batching)
    batch_size: int | str = field(default="auto", metadata=SPEED)
    cpu_workers: int | str = field(default="auto", metadata=SPEED)
    progress: bool = field(default=True, metadata=SPEED)
    checkpoint_items: int = field(default=500, metadata=SPEED)
    # the evaluator's layer-forward shortcut (ih_sweep.evaluation.fastpath); null: on where the
    # installed transformers is in the range the tests cover
    fast_layers: bool | None = field(default=None, metadata=SPEED)

    def cpu_worker_count(self) -> int | None:
        """Batches evaluated at once on CPU; None: torch's thread count (``auto``)."""
        return None if self.cpu_workers == "auto" else int(self.cpu_workers)


@dataclass
class ScoringConfig:
    source: ScoreSource = ScoreSource.compute
    file: str | None = None  # a score CSV or the notebook's pickle (source=file)
    rank_by: RankBy = RankBy.prefix
    n_sequences: int = 16  # repeated random sequences, [BOS] + R x repeats
    seq_len: int = 25
    repeats: int = 4
    seed: int = 0
    # sequences a batch; auto: 8 on CPU, on CUDA what the free memory holds (up to n_sequences)
    batch_size: int | str = field(default="auto", metadata=SPEED)
    exclude_frequent_frac: float = 0.0  # BPE vocabularies: drop the lowest ids
    exclude_rare_frac: float = 0.0  # ... and the highest
    # exclusion (Yin & Steinhardt 2025): the top-N by rank_by among the heads outside the
    # top floor(exclude_share x heads) by exclude_by (null: no exclusion); 0.02 is their
    # default (kayoyin/icl-heads src/ablate.py --excl_num)
    exclude_by: RankBy | None = None
    exclude_share: float = 0.02
    # FV scores (rank_by or exclude_by = fv; ih_sweep.heads.function_vectors, Todd et al. 2024)
    fv_prompts: int = 25  # corrupted prompts the indirect effect is averaged over
    fv_mean_prompts: int = 100  # clean prompts the head means are taken over
    fv_seed: int = 0  # the prompts' order and each prompt's answer shuffle
    fv_correct_only: bool = True  # only prompts the model answers right (Todd et al.)
    # rows a pass; auto: 64 on CPU, on CUDA what the free memory holds
    fv_batch_size: int | str = field(default="auto", metadata=SPEED)

    def uses(self, score: RankBy) -> bool:
        """Whether heads are chosen with ``score`` (ranked by it or excluded by it)."""
        return score in (self.rank_by, self.exclude_by)

    def induction_settings(self) -> dict[str, Any]:
        """What determines the induction scores (part of their cache key,
        :func:`ih_sweep.heads.score_table.cache_key`), as plain data: every field but how the
        scores are used (source, file, rank_by, the exclusion), the FV settings and speed
        fields."""
        skip = {"source", "file", "rank_by", *FV_KEYS, *EXCLUSION_KEYS} | {
            f.name for f in dataclasses.fields(self) if f.metadata.get("semantic") is False}
        return {k: v for k, v in _semantic(self).items() if k not in skip}


@dataclass
class AblationConfig:
    # a registered ablation method (ih_sweep.ablation.registry): zero, mean, position_mean,
    # resample (definitions and sources: their modules in ih_sweep/ablation/)
    method: str = "zero"
    # mean, position_mean (and resample past a donor's end): prompts the means are taken over
    n_reference: int = 64
    seed: int = 0  # resample: the draw of each story's donor story (ignored otherwise)


@dataclass
class MechanismConfig:
    """The evaluate job's mechanism check (:mod:`ih_sweep.pipeline.mechanism`): repeat loss and ICL
    score with the job's heads ablated and without, written to job.json."""

    enabled: bool = True
    n_sequences: int = 16  # repeated random sequences, [BOS] + R x repeats
    seq_len: int = 25
    repeats: int = 2  # R + R: the loss on the repeated half
    seed: int = 1000  # apart from scoring's seeds (seed, seed + 1): not the ranked sequences
    exclude_frequent_frac: float = 0.0  # as scoring's: BPE vocabularies' lowest ids
    exclude_rare_frac: float = 0.0  # ... and highest
    n_texts: int = 64  # stories of the job's data whose text gives the ICL score
    icl_window: int | None = None  # tokens averaged at each ICL position (null: 1/10 of the
    # text; 1: Olsson et al.'s single tokens)
    batch_size: int = field(default=32, metadata=SPEED)


@dataclass
class ScanConfig:
    n_stories: int = 200
    layers: list[int] | None = None  # null: every layer
    # heads ablated side by side; auto: 1 on CPU, on CUDA what the free memory holds
    heads_per_pass: int | str = field(default="auto", metadata=SPEED)
    repeat_sequences: int = 16
    seed: int = 0
    attribution: bool = True


@dataclass
class TrainConfig:
    """The recipe of the bundled tiny model (ih_sweep/assets/tiny/training.json)."""

    out_dir: str = "outputs/tiny_model"
    seed: int = 0
    threads: int = 2  # runs with other thread counts are not bit-identical
    hidden: int = 64
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 16
    intermediate: int = 256
    layers: int = 2
    rope_theta: float = 1_000_000.0
    warmup_steps: int = 1000  # phase 1: repeated random sequences, few heads active
    warmup_active_heads: int = 12
    task_steps: int = 2800  # phase 2: repeats + answer-only qa1 prompts
    task_masked_steps: int = 0  # task steps that keep the warm-up head mask
    repeat_share: float = 0.2
    repeat_weight: float = 0.5  # loss = answer mean + repeat_weight * repeat-token mean
    uniform_actor_questions: bool = True
    batch_size: int = 16
    lr: float = 0.005
    task_lr: float | None = None  # task-phase peak rate (null: lr)
    schedule: Schedule = Schedule.cosine
    decay_frac: float = 0.25  # wsd: share of steps in the final decay
    weight_decay: float = 0.01
    repeat_len: list[int] = field(default_factory=lambda: [10, 40])  # [min, max]
    repeat_count: list[int] = field(default_factory=lambda: [2, 3])  # [min, max]
    log_every: int = 100


@dataclass
class PathsConfig:
    cache_dir: str = "outputs/cache"  # score tables shared by jobs


@dataclass
class Config:
    job: Job = Job.evaluate
    # heads to ablate: a count (8), or a share of all the model's heads (10%, 0.5%),
    # resolved per model as ceil(layers x heads x P / 100) (selection.resolve_n_heads)
    n_heads: int | str = 8
    condition: Condition = Condition.high
    control_seed: int = 0  # the draw of condition=random
    # condition=random: draws control_seed .. control_seed + control_seeds - 1 in one job,
    # the model loaded once, each draw written as its own job folder (jobs/evaluate.py
    # run_seeds); other conditions draw nothing and ignore it, as they ignore control_seed
    control_seeds: int = 1
    device: str = field(default="auto", metadata=SPEED)  # auto | cpu | cuda | cuda:1 ...
    summarize: bool = field(default=True, metadata=SPEED)  # summarize a multirun at its end
    paths: PathsConfig = field(default_factory=PathsConfig, metadata=SPEED)
    model: ModelConfig = MISSING
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mechanism: MechanismConfig = field(default_factory=MechanismConfig)
    scan: ScanConfig = field(default_factory=ScanConfig)
    # the tiny model's recipe does not change what an evaluation or scan computes
    train: TrainConfig = field(default_factory=TrainConfig, metadata=SPEED)


GROUPS = {"model": ModelConfig, "quantization": QuantizationConfig, "data": DataConfig,
          "scoring": ScoringConfig, "ablation": AblationConfig, "eval": EvalConfig,
          "scan": ScanConfig, "train": TrainConfig}


def register() -> None:
    """Put the schema into Hydra's ConfigStore: ``base_config`` for the root and ``base`` in
    each group (the group's YAML files list it first in their defaults)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, node in GROUPS.items():
        cs.store(group=group, name="base", node=node)
    if not OmegaConf.has_resolver("ih_sweep.speed_keys"):
        OmegaConf.register_new_resolver("ih_sweep.speed_keys", speed_keys)
    if not OmegaConf.has_resolver("path_safe"):
        OmegaConf.register_new_resolver("path_safe", folder_name)


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
def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, type | None]]:
    """Each field of a schema dataclass with the dataclass of its node (a group or
    ``paths``), read from the type hints; None for a leaf."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name] if dataclasses.is_dataclass(hints[f.name]) else None)
            for f in dataclasses.fields(cls)}


def _speed_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, (f, node) in _fields(cls).items():
        dotted = prefix + name
        if f.metadata.get("semantic", True) is False:  # a whole group: every leaf key
            keys += [f"{dotted}.{leaf}" for leaf in _fields(node)] if node else [dotted]
        elif node:
            keys += _speed_keys(node, dotted + ".")
    return keys


def speed_keys() -> list[str]:
    """Dotted keys that change no result (``metadata=SPEED``), leaves only."""
    return _speed_keys(Config)


# --------------------------------------------------------------------------- hashing
def _without_hydra(cfg: DictConfig) -> DictConfig:
    """``cfg`` without Hydra's own node (``compose(return_hydra_config=True)`` keeps it)."""
    if "hydra" not in cfg:
        return cfg
    node = cfg.copy()
    with open_dict(node):
        node.pop("hydra")
    return node


def _semantic(node: Any) -> dict:
    if dataclasses.is_dataclass(node):
        node = OmegaConf.structured(node)
    else:
        node = _without_hydra(node)
    container = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    assert isinstance(container, dict)
    return container


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def plain(node: Any) -> Any:
    """A config node (dataclass or DictConfig) as plain dicts, lists and strings."""
    if dataclasses.is_dataclass(node):
        node = OmegaConf.structured(node)
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


def semantic_config(cfg: DictConfig | Config) -> dict:
    """What determines a job's results, as plain data: the resolved config minus Hydra's
    node, every speed key, and the settings that cannot matter for this job: the control
    seed of a condition other than ``random``, ``control_seeds`` unless a random job asks
    for several draws (so each draw of such a job hashes as its single-seed job), and for
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
    ablation = container.get("ablation")
    if isinstance(ablation, dict) and ablation.get("method") != "resample":
        ablation.pop("seed", None)  # only resample draws anything
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


def config_hash(cfg: DictConfig | Config) -> str:
    """16 hex digits naming what a job computes (its semantic config)."""
    return _digest(semantic_config(cfg))[:16]


# --------------------------------------------------------------------------- rules
def _need(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed; {allowed}")


def _exclusion_fractions(node: str, settings: Any) -> None:
    """The token-id exclusion fractions of the repeated random sequences (``scoring`` and
    ``mechanism`` draw them alike): each in [0, 1), their sum below 1."""
    for key in ("exclude_frequent_frac", "exclude_rare_frac"):
        value = getattr(settings, key)
        _need(0 <= value < 1, f"{node}.{key}", value, "allowed: 0 <= value < 1")
    _need(settings.exclude_frequent_frac + settings.exclude_rare_frac < 1,
          f"{node}.exclude_rare_frac", settings.exclude_rare_frac,
          "allowed: exclude_frequent_frac + exclude_rare_frac < 1")


def _at_least(key: str, value: Any, minimum: int) -> None:
    _need(value >= minimum, key, value, f"allowed: an integer >= {minimum}")


def _auto_or_at_least(key: str, value: Any, minimum: int = 1) -> None:
    """``auto`` or an integer >= ``minimum`` (a bool is not an integer here)."""
    _need(value == "auto" or (isinstance(value, int) and not isinstance(value, bool)
                              and value >= minimum), key, value,
          f"allowed: auto, or an integer >= {minimum}")


_SHARE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)%")


def n_heads_share(value: int | str) -> Fraction | None:
    """The percentage ``n_heads`` asks for, exactly (``"0.5%"`` -> 1/2: read from the
    decimal string, never through a float), or None when it is a count. Raises
    :class:`ConfigError` for anything but an integer >= 0 or ``P%`` with 0 < P <= 100
    (``0%`` is refused: no ablation is ``n_heads=0`` or ``condition=none``)."""
    allowed = ("allowed: an integer >= 0 (heads), or a share of all the model's heads "
               "P% with 0 < P <= 100, e.g. 1%, 0.5% (no ablation: n_heads=0 or "
               "condition=none)")
    if isinstance(value, int) and not isinstance(value, bool):
        _need(value >= 0, "n_heads", value, allowed)
        return None
    match = _SHARE.fullmatch(value) if isinstance(value, str) else None
    share = Fraction(match.group(1)) if match else None
    _need(share is not None and 0 < share <= 100, "n_heads", value, allowed)
    return share


def check(cfg: Config) -> None:
    """The rules the types cannot say (ranges, fields that depend on each other). Raises
    :class:`ConfigError` naming the first bad key, its value and what is allowed. Cheap:
    reads no file, loads no model."""
    n_heads_share(cfg.n_heads)
    _at_least("control_seed", cfg.control_seed, 0)
    _at_least("control_seeds", cfg.control_seeds, 1)
    _need(bool(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device)), "device", cfg.device,
          "allowed: auto, cpu, cuda, cuda:<index>, mps")
    _need(bool(cfg.paths.cache_dir.strip()), "paths.cache_dir", cfg.paths.cache_dir,
          "allowed: a folder for the score tables and finished jobs")
    _need(bool(cfg.model.path.strip()), "model.path", cfg.model.path,
          "allowed: a hub id (org/name), a local model folder, or builtin:tiny")
    _need(bool(cfg.model.name.strip()), "model.name", cfg.model.name,
          "allowed: a non-empty name for the model in results and caches")
    dm = cfg.model.device_map
    _need(dm is None or bool(re.fullmatch(r"auto|balanced|balanced_low_0|sequential|cpu|mps|"
                                          r"cuda(:\d+)?", dm)), "model.device_map", dm,
          "allowed: null, auto, balanced, balanced_low_0, sequential, cpu, cuda, cuda:<index>")
    data = cfg.data
    if data.n_stories is not None:
        _need(1 <= data.n_stories <= MAX_STORIES, "data.n_stories", data.n_stories,
              f"allowed: 1 to {MAX_STORIES:,} (or null: every story of the file)")
    if data.name == DataSource.babi_generated:
        _need(data.task == 1, "data.task", data.task,
              "allowed with data=babi_generated: 1 (use data=babi_files for tasks 1-20)")
        _need(data.n_stories is not None, "data.n_stories", data.n_stories,
              "allowed with data=babi_generated: a number of stories to generate")
        for key, default in (("lang", DataConfig.lang), ("path", DataConfig.path),
                             ("split", DataConfig.split)):
            _need(getattr(data, key) == default, f"data.{key}", getattr(data, key),
                  "it applies to data=babi_files and data=babi_hub only (the generator makes "
                  "task 1 stories of its own)")
    else:
        _need(data.task in BABI_TASKS, "data.task", data.task, "allowed: 1 to 20")
        _need(data.lang in LANGS, "data.lang", data.lang, f"allowed: {', '.join(LANGS)}")
    ev = cfg.eval
    _at_least("eval.max_new_tokens", ev.max_new_tokens, 1)
    _at_least("eval.n_shots", ev.n_shots, 0)
    _at_least("eval.demo_seed", ev.demo_seed, 0)
    _need(ev.format != PromptFormat.notebook or ev.n_shots == 0, "eval.n_shots", ev.n_shots,
          "eval.format=notebook shows a story's earlier questions instead of demos; allowed: 0 "
          "(demos: eval=helm or eval=lm_eval)")
    _need(all(ev.stop), "eval.stop", list(ev.stop), "allowed: a list of non-empty strings")
    clash = _overlapping_stops(list(ev.stop))
    _need(clash is None, "eval.stop", list(ev.stop),
          f"{clash}: the cut would then depend on the order of the list; allowed: stop strings "
          "none of which can overlap another")
    _auto_or_at_least("eval.batch_size", ev.batch_size)
    _at_least("eval.checkpoint_items", ev.checkpoint_items, 1)
    workers = ev.cpu_workers
    _need(workers == "auto" or (isinstance(workers, int) and workers >= 1), "eval.cpu_workers",
          workers, "allowed: auto, or an integer >= 1")
    sc = cfg.scoring
    _need(sc.source != ScoreSource.file or bool(sc.file), "scoring.file", sc.file,
          "scoring.source=file needs the path of a score CSV or the notebook's pickle")
    _need(sc.source == ScoreSource.file or sc.file is None, "scoring.file", sc.file,
          "it is read with scoring.source=file only (now: compute)")
    for key in ("n_sequences", "seq_len"):
        _at_least(f"scoring.{key}", getattr(sc, key), 1)
    _auto_or_at_least("scoring.batch_size", sc.batch_size)
    _at_least("scoring.repeats", sc.repeats, 2)
    _exclusion_fractions("scoring", sc)
    _scoring_choice(cfg)
    _at_least("ablation.n_reference", cfg.ablation.n_reference, 1)
    _at_least("ablation.seed", cfg.ablation.seed, 0)
    from ih_sweep.ablation.registry import ablation_names, get_ablation

    method = cfg.ablation.method
    _need(method in ablation_names(), "ablation.method", method,
          f"allowed: {', '.join(ablation_names())}")
    _need(cfg.job != Job.scan or method == "zero", "ablation.method",
          method, "job=scan zeroes each head (its exact scan and attribution patching "
          "estimate zero ablation); the other methods apply to job=evaluate")
    problem = get_ablation(method).config_problem(cfg)
    _need(problem is None, "ablation.method", method, str(problem))
    mech = cfg.mechanism
    for key in ("n_sequences", "seq_len", "n_texts", "batch_size"):
        _at_least(f"mechanism.{key}", getattr(mech, key), 1)
    _at_least("mechanism.repeats", mech.repeats, 2)
    if mech.icl_window is not None:
        _at_least("mechanism.icl_window", mech.icl_window, 1)
    _exclusion_fractions("mechanism", mech)
    scan = cfg.scan
    for key in ("n_stories", "repeat_sequences"):
        _at_least(f"scan.{key}", getattr(scan, key), 1)
    _auto_or_at_least("scan.heads_per_pass", scan.heads_per_pass)
    _need(scan.layers is None or len(scan.layers) > 0, "scan.layers", scan.layers,
          "allowed: null (every layer) or a non-empty list of layer indices")
    for layer in scan.layers or []:
        _at_least("scan.layers[]", layer, 0)
    tr = cfg.train
    for key in ("threads", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "layers",
                "batch_size", "log_every"):
        _at_least(f"train.{key}", getattr(tr, key), 1)
    for key in ("warmup_steps", "task_steps", "task_masked_steps", "warmup_active_heads"):
        _at_least(f"train.{key}", getattr(tr, key), 0)
    _need(tr.warmup_steps + tr.task_steps >= 1, "train.task_steps", tr.task_steps,
          "allowed: warmup_steps + task_steps >= 1")
    for key in ("repeat_len", "repeat_count"):
        pair = getattr(tr, key)
        _need(len(pair) == 2 and 1 <= pair[0] <= pair[1], f"train.{key}", pair,
              "allowed: [min, max] with 1 <= min <= max")
    _need(tr.heads % tr.kv_heads == 0, "train.kv_heads", tr.kv_heads,
          f"allowed: a divisor of train.heads={tr.heads} (grouped-query attention)")
    _need(tr.warmup_active_heads <= tr.heads, "train.warmup_active_heads",
          tr.warmup_active_heads, f"allowed: 0 to train.heads={tr.heads}")
    for key in ("lr", "rope_theta"):
        _need(getattr(tr, key) > 0, f"train.{key}", getattr(tr, key), "allowed: a number > 0")
    _need(tr.task_lr is None or tr.task_lr > 0, "train.task_lr", tr.task_lr,
          "allowed: null (train.lr) or a number > 0")
    for key in ("repeat_share", "decay_frac"):
        _need(0 <= getattr(tr, key) <= 1, f"train.{key}", getattr(tr, key),
              "allowed: 0 <= value <= 1")
    for key in ("repeat_weight", "weight_decay"):
        _need(getattr(tr, key) >= 0, f"train.{key}", getattr(tr, key), "allowed: >= 0")
    _need(bool(tr.out_dir.strip()), "train.out_dir", tr.out_dir,
          "allowed: a folder for the trained model (new, or one holding a tiny model)")


def _scoring_choice(cfg: Config) -> None:
    """The exclusion and FV rules of ``scoring`` (see :class:`ScoringConfig`)."""
    sc, ev = cfg.scoring, cfg.eval
    if sc.exclude_by is not None:
        _need(sc.exclude_by != sc.rank_by, "scoring.exclude_by", sc.exclude_by.value,
              f"it must differ from scoring.rank_by={sc.rank_by.value} (the top heads by "
              "another score are excluded)")
        _need(0 <= sc.exclude_share < 1, "scoring.exclude_share", sc.exclude_share,
              "allowed: 0 <= share < 1 (0.02: the top 2% of heads)")
    for key in ("fv_prompts", "fv_mean_prompts"):
        _at_least(f"scoring.{key}", getattr(sc, key), 1)
    _at_least("scoring.fv_seed", sc.fv_seed, 0)
    _auto_or_at_least("scoring.fv_batch_size", sc.fv_batch_size)
    if sc.uses(RankBy.fv) and sc.source == ScoreSource.compute:
        key = "rank_by" if sc.rank_by == RankBy.fv else "exclude_by"
        _need(ev.format == PromptFormat.notebook or ev.n_shots >= 2, "eval.n_shots",
              ev.n_shots, f"FV scores (scoring.{key}=fv) shuffle the answers of a prompt's "
              f"demonstrations; allowed with eval.format={ev.format.value}: n_shots >= 2")
        need = sc.fv_prompts + sc.fv_mean_prompts
        # a story gives one prompt under eval.scope=last: too few stories is known now,
        # before any job runs (the job itself counts the prompts FV can use)
        _need(cfg.condition == Condition.none or cfg.n_heads == 0 or cfg.data.n_stories is None
              or ev.scope != Scope.last or cfg.data.n_stories >= need, "data.n_stories",
              cfg.data.n_stories, f"FV scores (scoring.{key}=fv) take fv_mean_prompts + fv_prompts"
              f" = {need} prompts, one a story with eval.scope=last; allowed: >= {need}, or "
              "fewer scoring.fv_prompts / scoring.fv_mean_prompts")


def _overlapping_stops(stops: list[str]) -> str | None:
    """Why two stop strings could overlap in a text, or None. Where none can (no string
    contains another, no proper suffix of one begins another), cutting at the earliest
    occurrence of any equals HELM's and lm-eval's cut, one string after the other in list
    order (helm ``clients/client.py`` truncate_sequence, lm-eval ``models/utils.py``
    postprocess_generated_text), which :mod:`ih_sweep.evaluation.metrics` relies on."""
    for a in stops:
        for b in stops:
            if a != b and a in b:
                return f"{a!r} is part of {b!r}"
            for x in range(1, len(b)):
                if a != b and (a.startswith(b[x:]) or b[x:].startswith(a)):
                    return f"the end of {b!r} can begin {a!r}"
    return None


def _unknown_keys(node: DictConfig, cls: type, prefix: str = "") -> list[str]:
    """Keys in ``node`` that ``cls`` does not declare. Hydra's ``+key=value`` adds a key
    even to a typed node, and ``OmegaConf.to_object`` would then drop it silently."""
    declared = _fields(cls)
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
    """The composed config as the typed :class:`Config`, checked (:func:`check`).

    Raises :class:`ConfigError` for a missing mandatory value (e.g. ``model.path`` of
    ``model=hub``) or a broken rule."""
    if cfg.get("model") is None or not isinstance(cfg.model, DictConfig):
        raise ConfigError("model is missing; choose one, e.g. model=tiny or model=hub "
                          "model.path=EleutherAI/pythia-160m")
    if OmegaConf.is_missing(cfg.model, "path"):
        raise ConfigError("model.path is missing; give a hub id or a local folder, e.g. "
                          "model.path=EleutherAI/pythia-160m")
    node = _without_hydra(cfg)
    unknown = _unknown_keys(node, Config)
    if unknown:
        key = unknown[0]
        parent = key.rpartition(".")[0]
        cls = Config
        for part in filter(None, parent.split(".")):
            cls = _fields(cls)[part][1]
        known = ", ".join(_fields(cls))
        raise ConfigError(f"{key}={OmegaConf.select(node, key)!r} is not a config key; keys of "
                          f"{parent or 'the top level'}: {known}")
    typed = OmegaConf.to_object(node)
    assert isinstance(typed, Config), type(typed)
    check(typed)
    return typed

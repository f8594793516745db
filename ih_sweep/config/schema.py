"""The config schema: one typed dataclass per config group, the single source of truth.

The YAML files under ``conf/`` fill these in (defaults and docs); Hydra's ConfigStore holds
the dataclasses as each group's schema (:func:`ih_sweep.config.hydra.register`;
``conf/<group>/*.yaml`` start from ``base``), so OmegaConf rejects a wrong type, an unknown
key or a value outside an Enum at compose time. The rules that span fields or ranges are in
:mod:`ih_sweep.config.rules`, what names a job (hash, folder names) in
:mod:`ih_sweep.config.identity`. Modules receive the dataclasses themselves
(:func:`ih_sweep.config.hydra.settings`), never copies field by field, and take their
vocabularies (the Enums) from here. Two helpers read the dataclasses: :func:`schema_fields`
(each field with its node's dataclass) and :func:`plain` (a node as plain data, for what is
written or hashed). Importing this module imports neither torch nor any other module of the
package.

A field marked ``metadata=SPEED`` changes how fast or where a job runs, not what it computes:
those fields are left out of the config hash (:func:`ih_sweep.config.identity.config_hash`)
and of the job folder names (``hydra.job.config.override_dirname.exclude_keys`` is
:func:`ih_sweep.config.identity.speed_keys`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING

from ih_sweep.config.plain import plain


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


class ControlMatch(Choice):
    """What a random control is matched to the top-N on (:mod:`ih_sweep.heads.selection`)."""

    layer = "layer"  # as many heads in each layer as the top-N holds there
    layer_norm = "layer_norm"  # ... each within control.norm_factor of its top head's output
    # norm (ih_sweep.heads.output_norms)


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


class KnockoutMode(Choice):
    """How ``ablation=knockout`` removes a head's induction edges
    (:mod:`ih_sweep.ablation.knockout`)."""

    mask = "mask"  # -inf before the softmax: the other weights renormalised (Geva et al. 2023)
    zero = "zero"  # weights set to 0 after the softmax, not renormalised (Wang et al. 2023)


class Align(Choice):
    """How resample ablation lines a donor's positions up with a row's
    (:mod:`ih_sweep.ablation.donors`)."""

    start = "start"  # the same absolute position (counted from the first token)
    end = "end"  # the same position counted from the end of the prompt: the answer slots meet


class IclTokens(Choice):
    """Which tokens the mechanism check's ICL score compares
    (:mod:`ih_sweep.pipeline.mechanism`)."""

    auto = "auto"  # answers for the bundled tiny model (model.path=builtin:tiny), else text
    answers = "answers"  # the answers of the prompt's in-context examples: first vs last
    text = "text"  # the stories' own text: an early vs a late window of tokens


class DataSource(Choice):
    babi_generated = "babi_generated"  # the built-in generator of bAbI task 1
    babi_files = "babi_files"  # the release's text files
    babi_hub = "babi_hub"  # facebook/babi_qa on the Hugging Face hub


class Split(Choice):
    train = "train"
    valid = "valid"  # the en-valid / en-valid-10k folders' held-out part of train
    test = "test"
    generated = "generated"  # data=babi_generated: the generator's own stories, no release split


class Metric(Choice):
    """How a continuation is scored (:mod:`ih_sweep.evaluation.metrics` defines each)."""

    contains = "contains"  # the notebook's: every answer word is a word of the continuation
    exact = "exact"  # the first words are the answer's words
    quasi_exact = "quasi_exact"  # HELM's quasi_exact_match: equal after HELM's normalize_text
    verbatim = "verbatim"  # lm-eval's exact_match: equal character for character, no changes
    helm_exact = "helm_exact"  # HELM's exact_match: equal after stripping whitespace
    prefix_exact = "prefix_exact"  # HELM's prefix_exact_match: begins with the answer (stripped)
    quasi_prefix_exact = "quasi_prefix_exact"  # HELM's quasi_prefix_exact_match: normalized


class PromptFormat(Choice):
    """How a question is put to the model (:mod:`ih_sweep.data` builds each)."""

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


class Reference(Choice):
    """Which prompts the statistics of the unablated model are taken on: the reference
    means of mean / position-wise mean / resample ablation, and the FV scores' prompts
    (:mod:`ih_sweep.data.heldout`)."""

    heldout = "heldout"  # stories disjoint from the evaluated ones (a separate seed / split)
    evaluated = "evaluated"  # the evaluated prompts themselves (in-sample; before issue #30)


HELDOUT_STORIES = 400  # held-out stories at most (the FV default needs 125 usable prompts)
# ablation methods that take no reference prompts (ablation.reference means nothing to them)
NO_REFERENCE_METHODS = ("zero", "knockout")


class Schedule(Choice):
    cosine = "cosine"
    wsd = "wsd"  # warmup-stable-decay


FV_KEYS = ("fv_prompts", "fv_mean_prompts", "fv_seed", "fv_correct_only", "fv_batch_size",
           "fv_reference")
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
    split: Split = Split.generated  # babi_files, babi_hub: train, valid or test


@dataclass
class EvalConfig:
    metric: Metric = Metric.contains
    scope: Scope = Scope.last
    max_new_tokens: int = 3
    format: PromptFormat = PromptFormat.notebook  # the prompt (ih_sweep.data)
    n_shots: int = 0  # helm, lm_eval: answered demo questions before the asked one
    demo_seed: int = 0  # helm, lm_eval: seed of the demo draw (HELM: 0, lm-eval: 1234)
    # helm, lm_eval with data=babi_files/babi_hub: the LANGS folder whose train file gives the
    # demos; null: data.lang, except that format=helm on English files takes en-valid's or
    # else en's (1k) train file where data.path holds it (ih_sweep.data.prompts.demo_lang)
    demo_lang: str | None = None
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
    # MB of the outputs of layers no ablation touches, kept per batch for the process's next
    # evaluations of the same items (ih_sweep.evaluation.fastpath.reuse); auto: 1024 on CPU,
    # 0 (none) on a GPU
    layer_store_mb: int | str = field(default="auto", metadata=SPEED)

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
    # the FV prompts: held-out stories, or the evaluated prompts (ih_sweep.data.heldout)
    fv_reference: Reference = Reference.heldout
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
        return {k: v for k, v in plain(self).items() if k not in skip}


@dataclass
class AblationConfig:
    # a registered ablation method (ih_sweep.ablation.registry): zero, mean, position_mean,
    # resample, knockout (definitions and sources: their modules in ih_sweep/ablation/)
    method: str = "zero"
    # mean, position_mean (and resample past a donor's end): prompts the means are taken over
    n_reference: int = 64
    # where the reference prompts come from: held-out stories, or the first evaluated
    # prompts (ih_sweep.data.heldout; zero ablation takes none)
    reference: Reference = Reference.heldout
    seed: int = 0  # resample: the draw of each story's donor story (ignored otherwise)
    # knockout: mask (induction edges -inf before the softmax, the rest renormalised) or zero
    # (their weights 0 after the softmax, not renormalised); ignored by the other methods
    knockout: KnockoutMode = KnockoutMode.mask
    # resample: which donor position stands in for a row's position (ignored otherwise): start,
    # the same absolute position; end, the same distance from the end of the prompt
    align: Align = Align.start


@dataclass
class ControlConfig:
    """How ``condition=random`` draws its heads (:mod:`ih_sweep.heads.selection`); the other
    conditions draw nothing and ignore it, as they ignore ``control_seed``."""

    # layer: layer-matched (as many heads per layer as the top-N); layer_norm: also
    # norm-matched, each drawn head's mean output norm ||z_h W_O^h|| within a factor
    # norm_factor of the top head it stands for (ih_sweep.heads.selection.norm_matched)
    match: ControlMatch = ControlMatch.layer
    norm_factor: float = 2.0  # layer_norm: the ratio allowed either way (> 1)
    # control_seeds=K: distinct head sets of the draws evaluated this many at a time, each
    # story's row once per draw in the batches (one head set a row:
    # ih_sweep.ablation.hooks.ablate_head_sets); 1: one draw at a time. Same results
    # (ablation.method zero, mean, position_mean only)
    draws_per_pass: int = field(default=1, metadata=SPEED)


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
    # the ICL score's tokens: answers (the answer tokens of the in-context examples, first vs
    # last: what the bundled tiny model is trained to predict), text (the stories' own text,
    # early vs late window), auto (answers for model.path=builtin:tiny, else text)
    icl_tokens: IclTokens = IclTokens.auto
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
    control: ControlConfig = field(default_factory=ControlConfig)  # condition=random only
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


def schema_fields(cls: type) -> dict[str, tuple[dataclasses.Field, type | None]]:
    """Each field of a schema dataclass (by name) with the dataclass of its node (a group or
    ``paths``), read from the type hints; None for a leaf."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name] if dataclasses.is_dataclass(hints[f.name]) else None)
            for f in dataclasses.fields(cls)}

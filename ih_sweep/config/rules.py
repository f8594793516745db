"""The rules the types cannot say: ranges, and fields that depend on each other.

One function a group (:func:`check_top` for the top-level keys), each raising
:class:`~ih_sweep.config.errors.ConfigError` naming the first bad key, its value and what is
allowed (``<key>=<value!r> is not allowed; <allowed>``); :func:`check` runs them all in the
order of :class:`~ih_sweep.config.schema.Config`'s fields. Cheap: reads no file, loads no
model, imports neither torch nor any other stage of the package.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from ih_sweep.config.errors import ConfigError
from ih_sweep.config.schema import (
    BABI_TASKS,
    HELDOUT_STORIES,
    LANGS,
    MAX_STORIES,
    Condition,
    Config,
    DataConfig,
    DataSource,
    EvalConfig,
    Job,
    MechanismConfig,
    ModelConfig,
    PromptFormat,
    RankBy,
    Reference,
    ScanConfig,
    Scope,
    ScoreSource,
    Split,
    TrainConfig,
)


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


def check_top(cfg: Config) -> None:
    """The top-level keys: n_heads, control_seed(s), control.norm_factor,
    control.draws_per_pass, device, paths.cache_dir."""
    n_heads_share(cfg.n_heads)
    _at_least("control_seed", cfg.control_seed, 0)
    _at_least("control_seeds", cfg.control_seeds, 1)
    _at_least("control.draws_per_pass", cfg.control.draws_per_pass, 1)
    _need(cfg.control.norm_factor > 1, "control.norm_factor", cfg.control.norm_factor,
          "allowed: a number > 1 (the ratio a drawn head's output norm may differ from its "
          "top head's, either way)")
    _need(bool(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device)), "device", cfg.device,
          "allowed: auto, cpu, cuda, cuda:<index>, mps")
    _need(bool(cfg.paths.cache_dir.strip()), "paths.cache_dir", cfg.paths.cache_dir,
          "allowed: a folder for the score tables and finished jobs")


def check_model(model: ModelConfig) -> None:
    """``model``: a path and a name, a device map transformers knows."""
    _need(bool(model.path.strip()), "model.path", model.path,
          "allowed: a hub id (org/name), a local model folder, or builtin:tiny")
    _need(bool(model.name.strip()), "model.name", model.name,
          "allowed: a non-empty name for the model in results and caches")
    dm = model.device_map
    _need(dm is None or bool(re.fullmatch(r"auto|balanced|balanced_low_0|sequential|cpu|mps|"
                                          r"cuda(:\d+)?", dm)), "model.device_map", dm,
          "allowed: null, auto, balanced, balanced_low_0, sequential, cpu, cuda, cuda:<index>")


def check_data(data: DataConfig) -> None:
    """``data``: the story count, and the keys each source reads (the generator makes task 1
    stories of its own; files and hub take a task 1-20 and a release folder name)."""
    if data.n_stories is not None:
        _need(1 <= data.n_stories <= MAX_STORIES, "data.n_stories", data.n_stories,
              f"allowed: 1 to {MAX_STORIES:,} (or null: every story of the file)")
    if data.name == DataSource.babi_generated:
        _need(data.task == 1, "data.task", data.task,
              "allowed with data=babi_generated: 1 (use data=babi_files for tasks 1-20)")
        _need(data.n_stories is not None, "data.n_stories", data.n_stories,
              "allowed with data=babi_generated: a number of stories to generate")
        for key, default in (("lang", DataConfig.lang), ("path", DataConfig.path),
                             ("split", Split.generated)):
            value = getattr(data, key)
            _need(value == default, f"data.{key}", getattr(value, "value", value),
                  "it applies to data=babi_files and data=babi_hub only (the generator makes "
                  "task 1 stories of its own)")
    else:
        _need(data.task in BABI_TASKS, "data.task", data.task, "allowed: 1 to 20")
        _need(data.lang in LANGS, "data.lang", data.lang, f"allowed: {', '.join(LANGS)}")
        _need(data.split != Split.generated, "data.split", data.split.value,
              f"allowed with data={data.name.value}: train, valid, test (generated names the "
              "built-in generator's stories)")


def check_eval(ev: EvalConfig) -> None:
    """``eval``: token and demo counts, stop strings none of which can overlap another
    (:func:`overlapping_stops`), batch and worker counts."""
    _at_least("eval.max_new_tokens", ev.max_new_tokens, 1)
    _at_least("eval.n_shots", ev.n_shots, 0)
    _at_least("eval.demo_seed", ev.demo_seed, 0)
    _need(ev.demo_lang is None or ev.demo_lang in LANGS, "eval.demo_lang", ev.demo_lang,
          f"allowed: null (data.lang; HELM's format: en-valid or en where present), "
          f"{', '.join(LANGS)}")
    _need(ev.format != PromptFormat.notebook or ev.n_shots == 0, "eval.n_shots", ev.n_shots,
          "eval.format=notebook shows a story's earlier questions instead of demos; allowed: 0 "
          "(demos: eval=helm or eval=lm_eval)")
    _need(all(ev.stop), "eval.stop", list(ev.stop), "allowed: a list of non-empty strings")
    clash = overlapping_stops(list(ev.stop))
    _need(clash is None, "eval.stop", list(ev.stop),
          f"{clash}: the cut would then depend on the order of the list; allowed: stop strings "
          "none of which can overlap another")
    _auto_or_at_least("eval.batch_size", ev.batch_size)
    _at_least("eval.checkpoint_items", ev.checkpoint_items, 1)
    workers = ev.cpu_workers
    _need(workers == "auto" or (isinstance(workers, int) and workers >= 1), "eval.cpu_workers",
          workers, "allowed: auto, or an integer >= 1")
    store = ev.layer_store_mb
    _need(store == "auto" or (isinstance(store, int) and not isinstance(store, bool)
                              and store >= 0),
          "eval.layer_store_mb", store, "allowed: auto, or an integer >= 0 (0: off)")


def check_scoring(cfg: Config) -> None:
    """``scoring``: the score file, the sequences, then the exclusion and FV rules (these
    read ``eval``, ``data``, ``condition`` and ``n_heads`` too)."""
    sc, ev = cfg.scoring, cfg.eval
    _need(sc.source != ScoreSource.file or bool(sc.file), "scoring.file", sc.file,
          "scoring.source=file needs the path of a score CSV or the notebook's pickle")
    _need(sc.source == ScoreSource.file or sc.file is None, "scoring.file", sc.file,
          "it is read with scoring.source=file only (now: compute)")
    for key in ("n_sequences", "seq_len"):
        _at_least(f"scoring.{key}", getattr(sc, key), 1)
    _auto_or_at_least("scoring.batch_size", sc.batch_size)
    _at_least("scoring.repeats", sc.repeats, 2)
    _exclusion_fractions("scoring", sc)
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
        chooses = cfg.condition != Condition.none and cfg.n_heads != 0 and \
            ev.scope == Scope.last
        if sc.fv_reference == Reference.evaluated:  # on the job's own prompts
            _need(not chooses or cfg.data.n_stories is None or cfg.data.n_stories >= need,
                  "data.n_stories", cfg.data.n_stories, f"FV scores (scoring.{key}=fv) take "
                  f"fv_mean_prompts + fv_prompts = {need} prompts, one a story with "
                  f"eval.scope=last; allowed: >= {need}, or fewer scoring.fv_prompts / "
                  "scoring.fv_mean_prompts")
        elif cfg.data.name == DataSource.babi_generated:  # on the held-out stories
            _need(not chooses or need <= HELDOUT_STORIES, "scoring.fv_prompts", sc.fv_prompts,
                  f"FV scores take fv_mean_prompts + fv_prompts = {need} prompts of the "
                  f"{HELDOUT_STORIES} held-out stories (scoring.fv_reference=heldout), one a "
                  f"story with eval.scope=last; allowed: fv_mean_prompts + fv_prompts <= "
                  f"{HELDOUT_STORIES}, or scoring.fv_reference=evaluated")


def check_ablation(cfg: Config) -> None:
    """``ablation``: its counts, and the methods each job and data size allow (reads ``job``
    and ``data.n_stories``)."""
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
    from ih_sweep.ablation.registry import head_set_methods

    per_row = head_set_methods()
    _need(cfg.control.draws_per_pass == 1 or method in per_row, "control.draws_per_pass",
          cfg.control.draws_per_pass, f"allowed with ablation.method={method}: 1 (draws "
          f"share a batch with ablation.method={', '.join(per_row)}: {method} "
          + ("fills each row by its story)" if get_ablation(method).row_dependent else
             "edits attention)" if get_ablation(method).edits_attention else
             "has no fill shared by every head set)"))


def check_mechanism(mech: MechanismConfig) -> None:
    """``mechanism``: sequence and text counts, the ICL window, the exclusion fractions."""
    for key in ("n_sequences", "seq_len", "n_texts", "batch_size"):
        _at_least(f"mechanism.{key}", getattr(mech, key), 1)
    _at_least("mechanism.repeats", mech.repeats, 2)
    if mech.icl_window is not None:
        _at_least("mechanism.icl_window", mech.icl_window, 1)
    _exclusion_fractions("mechanism", mech)


def check_scan(scan: ScanConfig) -> None:
    """``scan``: story and sequence counts, heads a pass, the layers."""
    for key in ("n_stories", "repeat_sequences"):
        _at_least(f"scan.{key}", getattr(scan, key), 1)
    _auto_or_at_least("scan.heads_per_pass", scan.heads_per_pass)
    _need(scan.layers is None or len(scan.layers) > 0, "scan.layers", scan.layers,
          "allowed: null (every layer) or a non-empty list of layer indices")
    for layer in scan.layers or []:
        _at_least("scan.layers[]", layer, 0)


def check_train(tr: TrainConfig) -> None:
    """``train``: the tiny model's sizes, steps, rates and ranges."""
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


def check(cfg: Config) -> None:
    """Every rule, group by group (top level, model, data, eval, scoring, ablation,
    mechanism, scan, train). Raises :class:`ConfigError` naming the first bad key, its
    value and what is allowed."""
    check_top(cfg)
    check_model(cfg.model)
    check_data(cfg.data)
    check_eval(cfg.eval)
    check_scoring(cfg)
    check_ablation(cfg)
    check_mechanism(cfg.mechanism)
    check_scan(cfg.scan)
    check_train(cfg.train)


def overlapping_stops(stops: list[str]) -> str | None:
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

"""Hydra entry point: one job per (n_heads, condition, control_seed), plus the score and
train_tiny tasks and the end-of-multirun summary callback.

Heavy imports stay inside functions so that config errors surface before torch loads.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, config_hash, validate
from .runtime import keep_freed_memory

log = logging.getLogger("ih_sweep")

# job folder names come from overrides; a value like a hub id or a path must not nest folders
if not OmegaConf.has_resolver("path_safe"):
    OmegaConf.register_new_resolver("path_safe", lambda s: str(s).replace("/", "_") or "default")

RESULT_COLUMNS = ["story", "question_index", "line", "examples_before", "answer",
                  "continuation", "correct", "decided_by", "n_heads", "condition",
                  "control_seed", "model", "quantization", "data", "task", "split", "metric",
                  "scope", "ablation"]
HEAD_COLUMNS = ["layer", "head", "score", "rank_by"]
_EVAL_MEMO: dict[str, list] = {}


def config_dir() -> str:
    """conf/ at the repository root (source checkout) or ih_sweep/conf (installed wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError("ih_sweep's conf/ directory is missing from the installation")


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


# --------------------------------------------------------------------------- scores
def score_cache_path(cfg: DictConfig) -> Path:
    from .model_loading import model_slug

    settings = scoring_settings(cfg)
    slug = model_slug(_plain(cfg.model), _plain(cfg.quantization))
    return Path(cfg.paths.cache_dir) / "scores" / f"{slug}-{settings.key()}.csv"


def scoring_settings(cfg: DictConfig):
    from .scoring import ScoringSettings

    sc = cfg.scoring
    return ScoringSettings(n_sequences=sc.n_sequences, seq_len=sc.seq_len, repeats=sc.repeats,
                           seed=sc.seed, batch_size=sc.batch_size,
                           exclude_frequent_frac=sc.exclude_frequent_frac,
                           exclude_rare_frac=sc.exclude_rare_frac)


def get_scores(cfg: DictConfig, model_getter, progress: bool = False):
    """The score table: from scoring.file, or computed once and cached for every job.

    A file lock makes concurrent jobs wait for the one that computes; the CSV is written
    atomically, so a reader never sees a partial table.
    """
    from filelock import FileLock

    from .io_utils import write_csv
    from .scoring import load_score_file, score_heads

    if cfg.scoring.source == "file":
        return load_score_file(cfg.scoring.file, cfg.model.name), None
    path = score_cache_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            import pandas as pd

            log.info("reusing scores %s", path)
            return pd.read_csv(path), path
        from .model_loading import eager_attention

        model, tokenizer = model_getter()
        t0 = time.time()
        with eager_attention(model):
            df = score_heads(model, tokenizer, scoring_settings(cfg), cfg.model.name,
                             progress=progress)
        log.info("scored %d heads in %.1f s", len(df), time.time() - t0)
        write_csv(path, df)
        save_heatmap(df, cfg.scoring.rank_by, path.with_suffix(".png"), cfg.model.name)
    return df, path


def save_heatmap(scores, column: str, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io_utils import write_figure
    from .scoring import score_matrix

    mat = score_matrix(scores, column)
    fig, ax = plt.subplots(figsize=(max(4, mat.shape[1] * 0.25 + 2), max(2.5, mat.shape[0] * 0.3
                                                                         + 1.5)))
    im = ax.imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{title}: {column} score")
    fig.colorbar(im, ax=ax)
    write_figure(path, fig)
    plt.close(fig)
    return path


def _cpu_workers(value) -> int | None:
    """eval.cpu_workers: ``auto`` (None: torch's thread count) or a validated integer."""
    return None if value == "auto" else int(value)


def check_scores_fit(scores, n_layers: int, n_heads: int, source: str) -> None:
    """A supplied table may cover some layers only (the seed's does), but not other shapes."""
    if int(scores["layer"].max()) >= n_layers or scores["head"].nunique() != n_heads:
        raise ConfigError(
            f"scoring.file={source}: the table has layers up to {int(scores['layer'].max())} "
            f"and {scores['head'].nunique()} heads per layer, but the model has {n_layers} "
            f"layers x {n_heads} heads")


# --------------------------------------------------------------------------- the job
def finished_record(out_dir: Path, chash: str, output: str) -> dict | None:
    """The job.json of a job already complete for this config (with its output file), so the
    job is skipped rather than recomputed; None otherwise."""
    from .io_utils import read_json

    job_file = out_dir / "job.json"
    if not job_file.is_file() or not (out_dir / output).is_file():
        return None
    record = read_json(job_file)
    if record.get("status") != "complete" or record.get("config_hash") != chash:
        return None
    log.info("skipping %s: complete results exist for this config", out_dir)
    return record


def run_sweep_job(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Evaluate one (n_heads, condition, control_seed); skip if already complete."""
    from .io_utils import write_csv, write_json

    chash = config_hash(cfg)
    job_file = out_dir / "job.json"
    previous = finished_record(out_dir, chash, "results.csv")
    if previous is not None:
        return previous
    t_start = time.time()
    timings: dict[str, float] = {}
    import pandas as pd

    from .data import load_stories, make_items
    from .evaluation import EvalSettings
    from .model_loading import load_config, load_model
    from .scoring import score_matrix
    from .selection import select_heads

    # everything that can be checked without weights comes first
    mcfg = load_config(_plain(cfg.model))
    text_cfg = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
    n_layers = int(getattr(text_cfg, "num_hidden_layers", None) or text_cfg.n_layer)
    n_heads_model = int(getattr(text_cfg, "num_attention_heads", None) or text_cfg.n_head)
    if cfg.n_heads > n_layers * n_heads_model:
        raise ConfigError(f"n_heads={cfg.n_heads} is larger than the model's "
                          f"{n_layers * n_heads_model} heads ({n_layers} x {n_heads_model})")
    t0 = time.time()
    stories = load_stories(_plain(cfg.data))
    items = make_items(stories, cfg.eval.scope)
    timings["data_s"] = time.time() - t0

    loaded: dict[str, Any] = {}

    def model_getter():
        if "model" not in loaded:
            t = time.time()
            loaded["model"] = load_model(_plain(cfg.model), _plain(cfg.quantization), cfg.device)
            timings["load_s"] = time.time() - t
        return loaded["model"]

    t0 = time.time()
    if cfg.condition == "none" or cfg.n_heads == 0:
        scores, heads = None, []
    else:
        scores, _ = get_scores(cfg, model_getter, progress=cfg.eval.progress)
        if cfg.scoring.source == "file":
            check_scores_fit(scores, n_layers, n_heads_model, cfg.scoring.file)
        heads = select_heads(score_matrix(scores, cfg.scoring.rank_by), cfg.condition,
                             int(cfg.n_heads), int(cfg.control_seed))
    timings["scores_s"] = time.time() - t0

    settings = EvalSettings(metric=cfg.eval.metric, scope=cfg.eval.scope,
                            max_new_tokens=cfg.eval.max_new_tokens,
                            batch_size=cfg.eval.batch_size, progress=cfg.eval.progress,
                            cpu_workers=_cpu_workers(cfg.eval.get("cpu_workers", "auto")))
    memo_key = "|".join([str(sorted(heads)), cfg.ablation.method, chash_without_selection(cfg)])
    t0 = time.time()
    reused = memo_key in _EVAL_MEMO
    resumed = 0
    if reused:
        item_df = _EVAL_MEMO[memo_key]
        log.info("reusing an identical evaluation from this process (%d items)", len(item_df))
    else:
        item_df, resumed = _evaluate_checkpointed(cfg, out_dir, chash, model_getter, items,
                                                  heads, settings)
        _EVAL_MEMO[memo_key] = item_df
    timings["eval_s"] = time.time() - t0

    results_df = item_df.assign(
        n_heads=int(cfg.n_heads), condition=cfg.condition, control_seed=int(cfg.control_seed),
        model=cfg.model.name, quantization=cfg.quantization.name, data=cfg.data.name,
        task=int(cfg.data.task), split=cfg.data.get("split", "generated"),
        metric=cfg.eval.metric, scope=cfg.eval.scope, ablation=cfg.ablation.method,
    )[RESULT_COLUMNS]
    if scores is not None:
        mat = score_matrix(scores, cfg.scoring.rank_by)
        heads_df = pd.DataFrame([{"layer": la, "head": h, "score": float(mat[la, h]),
                                  "rank_by": cfg.scoring.rank_by} for la, h in heads],
                                columns=HEAD_COLUMNS)
    else:
        heads_df = pd.DataFrame(columns=HEAD_COLUMNS)
    write_csv(out_dir / "results.csv", results_df)
    write_csv(out_dir / "heads.csv", heads_df)
    n_correct = int(results_df["correct"].sum())
    timings["total_s"] = time.time() - t_start
    record = {
        "status": "complete", "config_hash": chash, "n_heads": int(cfg.n_heads),
        "condition": cfg.condition, "control_seed": int(cfg.control_seed),
        "model": cfg.model.name, "quantization": cfg.quantization.name,
        "data": _plain(cfg.data), "eval": {"metric": cfg.eval.metric, "scope": cfg.eval.scope,
                                           "max_new_tokens": cfg.eval.max_new_tokens},
        "ablation": cfg.ablation.method, "rank_by": cfg.scoring.rank_by,
        "n_items": len(results_df), "n_correct": n_correct,
        "accuracy": n_correct / max(len(results_df), 1),
        "n_decoded": int((results_df["decided_by"] != "forward").sum()),
        "heads": [list(h) for h in heads], "reused_evaluation": reused,
        "resumed_chunks": resumed,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "host": platform.node(),
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    write_json(job_file, record)
    shutil.rmtree(out_dir / "partial", ignore_errors=True)
    log.info("n_heads=%s condition=%s: %d/%d correct (%.1f%%)", cfg.n_heads, cfg.condition,
             n_correct, len(results_df), 100 * record["accuracy"])
    return record


def chash_without_selection(cfg: DictConfig) -> str:
    """Hash of what an evaluation depends on apart from the ablated heads."""
    import hashlib
    import json

    from .config import semantic_config

    sem = semantic_config(cfg)
    for key in ("n_heads", "condition", "control_seed", "task", "scoring"):
        sem.pop(key, None)
    return hashlib.sha256(json.dumps(sem, sort_keys=True, default=str).encode()).hexdigest()[:16]


ITEM_COLUMNS = RESULT_COLUMNS[:8]


def _evaluate_checkpointed(cfg, out_dir: Path, chash: str, model_getter, items, heads,
                           settings) -> tuple[Any, int]:
    """Evaluate in chunks of ``eval.checkpoint_items``, each written atomically to
    ``partial/``; a rerun after a kill (preemption, timeout, SIGKILL) reuses finished chunks,
    so rows are neither lost nor duplicated. Returns (item rows, number of chunks reused)."""
    import pandas as pd

    from .ablation import ablate_heads, head_means
    from .evaluation import evaluate
    from .io_utils import read_json, write_csv, write_json

    part = out_dir / "partial"
    size = int(cfg.eval.checkpoint_items)
    state = {"config_hash": chash, "chunk_items": size, "n_items": len(items)}
    if (part / "state.json").is_file() and read_json(part / "state.json") != state:
        log.info("discarding partial results of a different config in %s", part)
        shutil.rmtree(part)
    part.mkdir(parents=True, exist_ok=True)
    write_json(part / "state.json", state)
    frames, resumed, means = [], 0, None
    starts = list(range(0, len(items), size))
    for c, start in enumerate(starts):
        chunk_file = part / f"chunk-{c:05d}.csv"
        if chunk_file.is_file():
            frames.append(pd.read_csv(chunk_file, keep_default_na=False))
            resumed += 1
            continue
        model, tokenizer = model_getter()
        if cfg.ablation.method == "mean" and heads and means is None:
            means = head_means(model, _reference_batches(tokenizer, items,
                                                         cfg.ablation.n_reference, model))
        with ablate_heads(model, heads, cfg.ablation.method, means):
            res = evaluate(model, tokenizer, items[start:start + size], settings)
        df = pd.DataFrame([{
            "story": r.item.story_index, "question_index": r.item.question_index,
            "line": r.item.line, "examples_before": r.item.examples_before,
            "answer": r.item.answer, "continuation": r.continuation,
            "correct": bool(r.correct), "decided_by": r.decided_by} for r in res],
            columns=ITEM_COLUMNS)
        write_csv(chunk_file, df)
        frames.append(df)
        if len(starts) > 1:
            log.info("chunk %d/%d done", c + 1, len(starts))
    if resumed:
        log.info("resumed: %d of %d chunks were already done", resumed, len(starts))
    return pd.concat(frames, ignore_index=True), resumed


def _reference_batches(tokenizer, items, n: int, model, batch_size: int = 16):
    """Tokenized reference prompts for mean ablation (the first n evaluated prompts)."""
    import torch

    device = next(model.parameters()).device
    prompts = [it.prompt for it in items[:n]]
    batches = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True)
        batches.append({k: v.to(device) for k, v in enc.items() if isinstance(v, torch.Tensor)
                        and k in ("input_ids", "attention_mask")})
    return batches


# --------------------------------------------------------------------------- other tasks
def run_score_task(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    from .io_utils import write_csv
    from .model_loading import load_model

    scores, cached = get_scores(
        cfg, lambda: load_model(_plain(cfg.model), _plain(cfg.quantization), cfg.device),
        progress=True)
    write_csv(out_dir / "scores.csv", scores)
    save_heatmap(scores, cfg.scoring.rank_by, out_dir / "scores.png", cfg.model.name)
    top = scores.sort_values(cfg.scoring.rank_by, ascending=False).head(10)
    log.info("top heads by %s:\n%s", cfg.scoring.rank_by, top.to_string(index=False))
    return {"scores": str(out_dir / "scores.csv"), "cache": str(cached) if cached else None}


def run_scan_task(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Ablate every head (of ``scan.layers``) on its own; write scan.csv and plots."""
    from .data import load_stories, make_items
    from .io_utils import write_json
    from .model_loading import load_model
    from .scan import attribution_scan, babi_probe, exact_scan, repeat_probe, write_scan_outputs

    chash = config_hash(cfg)
    job_file = out_dir / "job.json"
    previous = finished_record(out_dir, chash, "scan.csv")
    if previous is not None:
        return previous
    t0 = time.time()
    model, tokenizer = load_model(_plain(cfg.model), _plain(cfg.quantization), cfg.device)
    scores, _ = get_scores(cfg, lambda: (model, tokenizer))
    stories = load_stories({**_plain(cfg.data), "n_stories": cfg.scan.n_stories})
    items = make_items(stories, "last")
    layers = list(cfg.scan.layers) if cfg.scan.layers is not None else None
    probes = {"babi": babi_probe(tokenizer, items),
              "repeat": repeat_probe(tokenizer, cfg.scan.repeat_sequences, seed=cfg.scan.seed)}
    t_exact = time.time()
    df = exact_scan(model, probes, layers, cfg.scan.heads_per_pass)
    t_exact = time.time() - t_exact
    if cfg.scan.attribution:
        df = df.merge(attribution_scan(model, probes["babi"], layers), on=["layer", "head"])
    df = df.merge(scores[["layer", "head", "prefix", "copying", "combined"]],
                  on=["layer", "head"], how="left")
    stats = write_scan_outputs(df, out_dir, cfg.scoring.rank_by, cfg.model.name)
    record = {"status": "complete", "task": "scan", "config_hash": chash,
              "model": cfg.model.name, "layers": sorted(df["layer"].unique().tolist()),
              "n_items": len(items), "rank_by": cfg.scoring.rank_by, "stats": stats,
              "timings": {"exact_s": round(t_exact, 2), "total_s": round(time.time() - t0, 2)}}
    write_json(job_file, record)
    return record


def run_train_task(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    from .tiny_model import TrainSettings, train_and_describe

    tc = _plain(cfg.train)
    target = Path(tc.pop("out_dir"))
    tc["repeat_len"] = tuple(tc["repeat_len"])
    tc["repeat_count"] = tuple(tc["repeat_count"])
    return train_and_describe(TrainSettings(**tc), target)


def _output_dir() -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called outside Hydra (tests)
        return Path.cwd()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate, then dispatch on ``task``."""
    validate(cfg)
    if cfg.scoring.source == "file" and not Path(cfg.scoring.file).is_file():
        raise ConfigError(f"scoring.file={cfg.scoring.file}: no such score file")
    keep_freed_memory()  # each job's process: no page faults on every new activation
    out_dir = _output_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.task == "score":
        return run_score_task(cfg, out_dir)
    if cfg.task == "train_tiny":
        return run_train_task(cfg, out_dir)
    if cfg.task == "scan":
        return run_scan_task(cfg, out_dir)
    return run_sweep_job(cfg, out_dir)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> Any:
    try:
        return run(cfg)
    except ConfigError as err:
        print(f"ih_sweep: config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


class SummarizeCallback(Callback):
    """Summarize the sweep folder when a multirun ends (also after SLURM jobs return)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get("summarize", True) or config.get("task", "sweep") not in ("sweep",
                                                                                   "scan"):
            return
        from .summary import summarize

        try:
            summarize(Path(config.hydra.sweep.dir))
        except Exception as err:  # a summary problem must not hide the jobs' results
            log.error("summary of %s failed: %s", config.hydra.sweep.dir, err)

"""The GPU checks of issue #21 in one command, from the project root on a CUDA machine:

    python benchmarks/gpu_check.py                      # everything
    python benchmarks/gpu_check.py --only equality noise --items 30    # a part, smaller

1. ``equality``: per-item outcomes of the evaluator against one-story-at-a-time ``generate``
   (:func:`ih_sweep.testing.generate_one_at_a_time`) in float32: the tiny model (last and
   every question, unablated and its top-16 prefix-matching heads ablated) and random-weight
   models of every supported family built with the tiny tokenizer (Llama, Mistral, Qwen2,
   Gemma, GPT-2, GPT-NeoX, OPT; unablated and 2 heads ablated). Target: 0 differences.
2. ``noise``: the tiny model in bf16 and nf4, unablated and top-16 ablated: items whose
   outcome flips against ``generate``, how many of those the evaluator marks as near-ties
   (``ItemResult.near_tie``; ``n/a`` where the evaluator has no such field) and near-ties
   overall. In half precision a near-tie can fall either way with the batch shape, for
   ``generate`` too (benchmarks/README.md), so flips that are near-ties are expected.
3. ``sweep``: the default sweep through the CLI, ``python -m ih_sweep -m n_heads=4,8,16
   condition=high,low,none device=cuda`` (its own cache folder: ``device`` is not part of a
   job's hash, so a CPU run's results would otherwise be reused): exit status, wall time and
   accuracies against the CPU table of the project README.
4. ``bench``: ``benchmarks/bench_gpu.py`` in bf16 (``--stories``) and nf4
   (``--nf4-stories``): stories/s, the ratio to the notebook's method, MFU and the
   evaluator's time over the plain forward's, against the #21 targets.

Prints one table (check | result | target | verdict) and writes ``gpu_check.json`` into
``--out``. Exit status 1 when a correctness check fails (a float32 difference, a flip that is
not a near-tie, a failed sweep, a step that raised), else 0; missed speed targets are marked
``MISSED`` in the table without failing. Without CUDA it says so in one line and exits 0.
``--device cpu`` runs the checks on CPU instead (a smoke run; the speed targets are for a
GPU). Its parts, run as separate scripts on one H200 on 2026-11-30, took ~220 s
(``../shared/tools/gpu/run.sh``) plus the noise check; this command ran on one H200 on
2026-12-01 in 203 s (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
STEPS = ("equality", "noise", "sweep", "bench")
# the default sweep's accuracies (%) on CPU, from the project README's table
README_ACCURACY = {("high", 4): 99.9, ("high", 8): 76.7, ("high", 16): 30.3,
                   **{(c, n): 100.0 for c in ("low", "none") for n in (4, 8, 16)}}
# issue #21's speed targets
TARGET_SPEEDUP = 25.0  # x the notebook's one-story-at-a-time method
TARGET_OVERHEAD = 1.15  # evaluator time / plain forward time, at most
TARGET_MFU = 0.40
TARGET_NF4_SLOWDOWN = 1.3  # nf4 time / bf16 time, at most


@dataclass
class Row:
    """One line of the table. ``verdict``: ok, FAILED (correctness), MISSED (a speed
    target), n/a (nothing to judge)."""

    check: str
    result: str
    target: str
    verdict: str


# --------------------------------------------------------------------------- table (CPU-side)
def format_table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| check | result | target | verdict |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {r.result} | {r.target} | {r.verdict} |" for r in rows]
    return "\n".join(lines)


def failed(rows: Sequence[Row]) -> bool:
    return any(r.verdict == "FAILED" for r in rows)


def equality_row(case: str, counts: dict) -> Row:
    """A float32 case: every outcome must equal ``generate``'s."""
    diff = counts["flips"]
    return Row(f"equality {case}", f"{diff} of {counts['items']} outcomes differ", "0",
               "ok" if diff == 0 else "FAILED")


def noise_row(case: str, counts: dict) -> Row:
    """A half-precision case: flips against ``generate`` are allowed where they are
    near-ties (unknown without the evaluator's ``near_tie``: n/a)."""
    flips, near = counts["flips"], counts["flipped_near_ties"]
    ties = counts["near_ties"]
    result = f"{flips} of {counts['items']} flip; " + \
        ("near-ties: n/a (no ItemResult.near_tie)" if near is None else
         f"{near} of the flips are near-ties; {ties} near-ties in all")
    if near is None:
        verdict = "ok" if flips == 0 else "n/a"
    else:
        verdict = "ok" if near == flips else "FAILED"
    return Row(f"noise {case}", result, "every flip a near-tie", verdict)


def sweep_rows(rc: int, wall_s: float, accuracy: dict[tuple[str, int], float]) -> list[Row]:
    """The CLI sweep: exit status, then accuracies against the README's CPU figures."""
    rows = [Row("sweep: exit status, wall", f"{rc}, {wall_s:.0f} s", "0",
                "ok" if rc == 0 else "FAILED")]
    if accuracy:
        got = " / ".join(f"{accuracy.get(k, float('nan')):.1f}" for k in README_ACCURACY)
        want = " / ".join(f"{v:.1f}" for v in README_ACCURACY.values())
        same = all(abs(accuracy.get(k, -1) - v) < 0.05 for k, v in README_ACCURACY.items())
        rows.append(Row("sweep accuracy % (high 4/8/16, low 4/8/16, none 4/8/16)", got,
                        f"CPU: {want}", "ok" if same else "FAILED"))
    return rows


def bench_rows(quant: str, r: dict, bf16: dict | None = None) -> list[Row]:
    """bench_gpu.py's numbers for one quantization (``r``: its JSON entry) against the #21
    targets; nf4 also against bf16's stories/s."""
    def judge(ok: bool | None) -> str:
        return "n/a" if ok is None else ("ok" if ok else "MISSED")

    mfu = r.get("mfu")
    rows = [
        Row(f"bench {quant}: x notebook's method",
            f"{r['speedup_vs_seed']}x ({r['engine_stories_per_s']} vs "
            f"{r['seed_method_stories_per_s']} stories/s, {r['stories']} stories, batch "
            f"{r.get('batch_size')})", f">= {TARGET_SPEEDUP:g}x",
            judge(r["speedup_vs_seed"] >= TARGET_SPEEDUP)),
        Row(f"bench {quant}: evaluator / plain forward",
            f"{r['overhead_vs_plain']}x ({r['engine_s']} s vs {r['plain_forward_s']} s)",
            f"<= {TARGET_OVERHEAD}x", judge(r["overhead_vs_plain"] <= TARGET_OVERHEAD)),
        Row(f"bench {quant}: MFU", "n/a" if mfu is None else f"{100 * mfu:.1f}%"
            + ("" if r.get("plain_forward_mfu") is None else
               f" (plain forward {100 * r['plain_forward_mfu']:.1f}%)"),
            f">= {100 * TARGET_MFU:g}%", judge(None if mfu is None else mfu >= TARGET_MFU)),
        Row(f"bench {quant}: outcomes on the subset", "identical" if
            r["subset_outcomes_identical"] else "differ", "identical (near-ties aside)",
            "ok" if r["subset_outcomes_identical"] else "n/a"),
    ]
    if bf16 is not None:
        slow = bf16["engine_stories_per_s"] / r["engine_stories_per_s"]
        rows.append(Row(f"bench {quant}: time / bf16's", f"{slow:.2f}x",
                        f"<= {TARGET_NF4_SLOWDOWN}x", judge(slow <= TARGET_NF4_SLOWDOWN)))
    return rows


# --------------------------------------------------------------------------- the checks
def _is_correct():
    try:  # the metric functions may live in their own module
        from ih_sweep.evaluation.metrics import is_correct
    except ImportError:
        from ih_sweep.evaluation.evaluator import is_correct
    return is_correct


def compare(model, tok, items, heads) -> dict:
    """The evaluator (``eval.batch_size=auto``) against one-at-a-time ``generate`` with
    ``heads`` ablated: items, outcome flips, flipped items the evaluator marks near-ties and
    near-ties in all (None for both where ItemResult has no ``near_tie``)."""
    from ih_sweep.ablation.hooks import ablate_heads
    from ih_sweep.config.schema import EvalConfig
    from ih_sweep.evaluation.evaluator import evaluate
    from ih_sweep.testing import generate_one_at_a_time

    is_correct = _is_correct()
    with ablate_heads(model, heads):
        got = evaluate(model, tok, items, EvalConfig(progress=False))
        ref = [generate_one_at_a_time(model, tok, it) for it in items]
    flips = [i for i, (r, c) in enumerate(zip(got, ref))
             if r.correct != is_correct(c, r.item.answer, "contains")]
    near = [getattr(r, "near_tie", None) for r in got]
    known = bool(near) and all(n is not None for n in near)
    return {"items": len(items), "flips": len(flips),
            "flipped_near_ties": sum(bool(near[i]) for i in flips) if known else None,
            "near_ties": sum(map(bool, near)) if known else None}


def family_builders(vocab: int) -> dict[str, Callable]:
    """Small random-weight models of every supported family (as tests/ablation/test_ablation.py)."""
    import transformers as tf

    c = dict(vocab_size=vocab)
    return {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, **c)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, head_dim=16, **c)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, **c)),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=16, **c)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, **c)),
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            **c)),
        "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(
            hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=64, **c)),
    }


def _tiny(device: str, dtype: str, quant: str):
    from ih_sweep.config.schema import DType, ModelConfig, Quantization, QuantizationConfig
    from ih_sweep.model.loading import load_model

    return load_model(ModelConfig(name="tiny", path="builtin:tiny", dtype=DType(dtype)),
                      QuantizationConfig(name=Quantization(quant)), device)


def top_heads(model, tok, n: int = 16) -> list[tuple[int, int]]:
    """The model's top-``n`` heads by prefix matching (the sweep's ``high`` condition)."""
    from ih_sweep.config.schema import ScoringConfig
    from ih_sweep.heads.scoring import score_heads, score_matrix
    from ih_sweep.heads.selection import select_heads
    from ih_sweep.model.loading import eager_attention

    with eager_attention(model):
        scores = score_matrix(score_heads(model, tok, ScoringConfig()), "prefix")
    return select_heads(scores, "high", n)


def _guarded(name: str, fn: Callable[[], list[Row]]) -> list[Row]:
    """A step's rows, or one FAILED row saying what it raised (the other steps still run)."""
    try:
        return fn()
    except Exception as err:  # report and go on
        return [Row(name, f"raised {type(err).__name__}: {str(err)[:200]}", "runs", "FAILED")]


def equality_checks(device: str, items: int, tiny_items: int,
                    families: Sequence[str] | None = None) -> list[Row]:
    """Step 1 (float32): the tiny model and the random-weight families."""
    import torch

    from ih_sweep import data
    from ih_sweep.model.tiny import build_tokenizer

    rows: list[Row] = []

    def tiny_cases() -> list[Row]:
        model, tok = _tiny(device, "float32", "none")
        last = data.make_items(data.generate_stories(tiny_items, seed=4242), "last")
        every = data.make_items(data.generate_stories(max(1, tiny_items // 4), seed=4243),
                                "all")
        out = []
        for label, heads in (("unablated", []), ("top-16 ablated", top_heads(model, tok))):
            out.append(equality_row(f"tiny fp32 last {label}", compare(model, tok, last,
                                                                      heads)))
            out.append(equality_row(f"tiny fp32 all {label}", compare(model, tok, every,
                                                                     heads)))
        return out

    rows += _guarded("equality tiny fp32", tiny_cases)
    tok = build_tokenizer()
    stories = data.make_items(data.generate_stories(items, seed=4244), "last")
    for name, build in family_builders(len(tok)).items():
        if families is not None and name not in families:
            continue

        def family_cases(name=name, build=build) -> list[Row]:
            torch.manual_seed(0)
            model = build().to(device, torch.float32).eval()
            return [equality_row(f"{name} fp32 {label}", compare(model, tok, stories, heads))
                    for label, heads in (("unablated", []),
                                         ("2 heads ablated", [(0, 1), (1, 2)]))]

        rows += _guarded(f"equality {name} fp32", family_cases)
    return rows


def noise_checks(device: str, items: int) -> list[Row]:
    """Step 2: the tiny model in bf16 and nf4, unablated and top-16 ablated."""
    from ih_sweep import data

    stories = data.make_items(data.generate_stories(items, seed=4245), "last")
    reference, tok = _tiny(device, "float32", "none")
    high = top_heads(reference, tok)  # the sweep's heads (scored in float32)
    rows: list[Row] = []
    for quant in ("none", "nf4"):
        label = "bf16" if quant == "none" else "nf4"

        def cases(quant=quant, label=label) -> list[Row]:
            model, tok = _tiny(device, "bfloat16", quant)
            return [noise_row(f"tiny {label} {what}", compare(model, tok, stories, heads))
                    for what, heads in (("unablated", []), ("top-16 ablated", high))]

        rows += _guarded(f"noise tiny {label}", cases)
    return rows


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def sweep_check(device: str, work: Path, timeout_s: int) -> list[Row]:
    """Step 3: the default sweep through the CLI on ``device``."""
    import pandas as pd

    sweep = work / "sweep"
    cmd = [sys.executable, "-m", "ih_sweep", "-m", "n_heads=4,8,16",
           "condition=high,low,none", f"device={device}", "eval.progress=false",
           f"hydra.sweep.dir={sweep}", f"paths.cache_dir={work / 'cache'}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=_env(), capture_output=True, text=True,
                          timeout=timeout_s)
    wall = time.perf_counter() - t0
    (work / "sweep.log").write_text(proc.stdout + proc.stderr)
    accuracy = {}
    if (sweep / "summary.csv").is_file():
        df = pd.read_csv(sweep / "summary.csv")
        accuracy = {(str(r.condition), int(r.n_heads)): round(100 * float(r.accuracy), 1)
                    for r in df.itertuples()}
        if ("none", 0) in accuracy:  # one unablated job stands for every N
            accuracy.update({("none", n): accuracy[("none", 0)] for n in (4, 8, 16)})
    return sweep_rows(proc.returncode, wall, accuracy)


def bench_check(device: str, work: Path, stories: int, nf4_stories: int, timeout_s: int,
                extra: Sequence[str] = ()) -> list[Row]:
    """Step 4: bench_gpu.py in bf16, then nf4."""
    results: dict[str, dict] = {}
    rows: list[Row] = []
    for quant, n in (("bf16", stories), ("nf4", nf4_stories)):
        out = work / f"bench-{quant}"
        cmd = [sys.executable, str(BENCH / "bench_gpu.py"), "--quant", quant, "--stories",
               str(n), "--device", device, "--out", str(out), *extra]
        proc = subprocess.run(cmd, cwd=BENCH, env=_env(), capture_output=True, text=True,
                              timeout=timeout_s)
        files = sorted(out.glob("*.json"))
        if proc.returncode != 0 or not files:
            rows.append(Row(f"bench {quant}", f"exit {proc.returncode}: "
                            f"{proc.stderr.strip().splitlines()[-1:] or ''}", "runs",
                            "FAILED"))
            continue
        results[quant] = json.loads(files[0].read_text())[quant]
        rows += bench_rows(quant, results[quant],
                           results.get("bf16") if quant == "nf4" else None)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--items", type=int, default=60, help="items per family (equality)")
    p.add_argument("--tiny-items", type=int, default=200,
                   help="tiny model's last-question items (equality; every question: 1/4)")
    p.add_argument("--noise-items", type=int, default=400)
    p.add_argument("--stories", type=int, default=2000, help="bench_gpu.py bf16")
    p.add_argument("--nf4-stories", type=int, default=500, help="bench_gpu.py nf4")
    p.add_argument("--out", default=str(BENCH / "results"))
    args = p.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}); nothing checked")
        return 0
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    rows: list[Row] = []
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        steps = {
            "equality": lambda: equality_checks(args.device, args.items, args.tiny_items),
            "noise": lambda: noise_checks(args.device, args.noise_items),
            "sweep": lambda: sweep_check(args.device, work, 900),
            "bench": lambda: bench_check(args.device, work, args.stories, args.nf4_stories,
                                         900, () if args.device == "cuda" else
                                         ("--shape", "small", "--seed-subset", "4")),
        }
        for name in STEPS:
            if name in args.only:
                t0 = time.perf_counter()
                rows += _guarded(name, steps[name])
                timings[name] = round(time.perf_counter() - t0, 1)
                print(f"gpu_check: {name} done in {timings[name]} s", file=sys.stderr,
                      flush=True)
    import transformers

    print(f"gpu_check on {device_name} (torch {torch.__version__}, transformers "
          f"{transformers.__version__}):\n")
    print(format_table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(
        {"device": device_name, "torch": torch.__version__,
         "transformers": transformers.__version__, "timings_s": timings,
         "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    return 1 if failed(rows) else 0


if __name__ == "__main__":
    sys.exit(main())

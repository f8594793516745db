"""The bundled tiny model: a small Mistral-architecture LM trained by the project itself.

Why it exists: the sweep must mean something offline on a 2-core CPU. Training on bAbI text
alone never forms induction heads, so the recipe first trains on repeated random sequences
with only a few heads per layer switched on (so induction concentrates in few, clean heads),
then mixes repeats with bAbI prompts, scoring the loss on answer tokens only.

Retrain with ``ih-sweep job=train_tiny`` (see conf/train/tiny.yaml).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from contextlib import ExitStack
from dataclasses import asdict
from enum import Enum
from pathlib import Path

import torch

from ih_sweep import data as babi
from ih_sweep.config.schema import Schedule, ScoringConfig, TrainConfig
from ih_sweep.model.architecture import hook_z
from ih_sweep.model.loading import eager_attention

log = logging.getLogger(__name__)

SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
NEWLINE = "\u00b6"  # the tokenizer maps "\n" to this visible word
N_FILLER = 256


def task_words() -> list[str]:
    """Every word and symbol of qa1 prompts, in a fixed order."""
    header = babi.PROMPT_HEADER.replace("\n", " ").replace(".", " . ").split()
    words = header + ["Passage", "Question", "Answer", ":", "?", ".", NEWLINE, "Where", "is"]
    words += list(babi.ACTORS) + list(babi.LOCATIONS) + ["the"]
    for phrase in babi.MOVE_PHRASES:
        words += phrase.split()
    seen: list[str] = []
    for w in words:
        if w not in seen:
            seen.append(w)
    return seen


def build_tokenizer():
    """Word-level fast tokenizer; newlines are tokens so the prompt's layout survives."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_list = SPECIALS + task_words() + [f"w{i:03d}" for i in range(N_FILLER)]
    vocab = {w: i for i, w in enumerate(vocab_list)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Replace(Regex(r"\n"), f" {NEWLINE} ")
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.Sequence([decoders.Replace(NEWLINE, "\n"),
                                     decoders.WordPiece(cleanup=True)])
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]", pad_token="[PAD]")


def build_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 32,
                 kv_heads: int = 8, head_dim: int = 16, intermediate: int = 256,
                 rope_theta: float = 10000.0):
    from transformers import MistralConfig

    return MistralConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=head_dim,
                         max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=rope_theta,
                         sliding_window=None, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)


def recipe(settings: TrainConfig) -> dict:
    """The settings as plain data for training.json: every field but ``out_dir`` (where the
    run is written is no part of the recipe), Enums as their values."""
    return {k: v.value if isinstance(v, Enum) else v for k, v in asdict(settings).items()
            if k != "out_dir"}


def _repeat_batch(rng: random.Random, n: int, settings: TrainConfig, candidates: list[int],
                  bos: int) -> list[tuple[list[int], list[int]]]:
    """(tokens, loss mask) pairs of [BOS] + R repeated; loss on repeats 2.. only."""
    out = []
    for _ in range(n):
        length = rng.randint(*settings.repeat_len)
        count = rng.randint(*settings.repeat_count)
        r = rng.sample(candidates, length)
        tokens = [bos] + r * count
        mask = [0] * (1 + length) + [1] * (length * (count - 1))
        out.append((tokens, mask))
    return out


def _babi_batch(rng: random.Random, n: int, tokenizer, answer_ids: set[int],
                uniform_actor: bool = False) -> list[tuple[list[int], list[int]]]:
    """(tokens, loss mask) pairs of full qa1 prompts; loss on the answer words only."""
    out = []
    for _ in range(n):
        story = babi.generate_qa1_story(rng, uniform_actor=uniform_actor)
        text = next(babi.iter_lm_text([story]))
        ids = tokenizer(text)["input_ids"]
        colon = tokenizer.convert_tokens_to_ids(":")
        answer_tok = tokenizer.convert_tokens_to_ids("Answer")
        mask = [0] * len(ids)
        for i in range(2, len(ids)):
            if ids[i - 2] == answer_tok and ids[i - 1] == colon and ids[i] in answer_ids:
                mask[i] = 1
        out.append((ids, mask))
    return out


def _collate(pairs: list[tuple[list[int], list[int]]], pad: int):
    t = max(len(p[0]) for p in pairs)
    ids = torch.full((len(pairs), t), pad, dtype=torch.long)
    mask = torch.zeros((len(pairs), t), dtype=torch.float32)
    attn = torch.zeros((len(pairs), t), dtype=torch.long)
    for i, (tok, m) in enumerate(pairs):
        ids[i, :len(tok)] = torch.tensor(tok)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.float32)
        attn[i, :len(tok)] = 1
    return ids, mask, attn


def _loss(model, ids, weights, attn):
    """Weighted token NLL; the weights already sum to the objective's mix."""
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (nll * weights[:, 1:]).sum()


def _weights(mask: torch.Tensor, is_repeat: torch.Tensor, repeat_weight: float) -> torch.Tensor:
    """Per-token weights: each objective averaged over its own tokens, so ~50 repeat tokens per
    sequence do not drown the 5 answer tokens of a bAbI prompt."""
    rep = mask * is_repeat[:, None]
    task = mask * (~is_repeat)[:, None]
    w = torch.zeros_like(mask)
    if task.sum() > 0:
        w += task / task.sum()
    if rep.sum() > 0:
        w += rep / rep.sum() * (repeat_weight if task.sum() > 0 else 1.0)
    return w


def train_tiny(settings: TrainConfig, out_dir: str | Path | None = None) -> dict:
    """Train from scratch; returns a record of the run. Saves model + tokenizer if out_dir
    (``settings.out_dir`` is the command line's; this function writes only where told)."""
    from transformers import MistralForCausalLM

    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    tokenizer = build_tokenizer()
    config = build_config(len(tokenizer), settings.hidden, settings.layers, settings.heads,
                          settings.kv_heads, settings.head_dim, settings.intermediate,
                          settings.rope_theta)
    model = MistralForCausalLM(config)
    model.set_attn_implementation("sdpa")
    model.train()
    special = set(tokenizer.all_special_ids)
    candidates = [i for i in range(len(tokenizer)) if i not in special]
    answer_ids = {tokenizer.convert_tokens_to_ids(w) for w in babi.LOCATIONS}
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr,
                            weight_decay=settings.weight_decay, betas=(0.9, 0.98))
    total = settings.warmup_steps + settings.task_steps

    def lr_at(step: int) -> float:
        if step < 100:
            return settings.lr * (step + 1) / 100
        if settings.schedule == Schedule.wsd:
            peak = settings.lr
            if step >= settings.warmup_steps and settings.task_lr is not None:
                peak = settings.task_lr
            decay_start = total * (1 - settings.decay_frac)
            if step < decay_start:
                return peak
            return peak * max(0.02, (total - step) / (total - decay_start))
        cosine = 0.5 * (1 + math.cos(math.pi * step / total))
        return settings.lr * (0.05 + 0.95 * cosine)

    # warm-up: only a few heads per layer active (zeroed at the o_proj input)
    head_dim = settings.head_dim
    gen = torch.Generator().manual_seed(settings.seed)
    masks = []
    for _ in range(settings.layers):
        keep = torch.randperm(settings.heads, generator=gen)[:settings.warmup_active_heads]
        m = torch.zeros(settings.heads)
        m[keep] = 1
        masks.append(m.repeat_interleave(head_dim))
    history: list[dict] = []
    t0 = time.time()
    with ExitStack() as head_mask:
        head_mask.enter_context(hook_z(model, lambda layer, z: z * masks[layer]))
        for step in range(total):
            if step == settings.warmup_steps + settings.task_masked_steps:
                head_mask.close()  # every head trains from here on
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            if step < settings.warmup_steps:
                n_rep = settings.batch_size
                pairs = _repeat_batch(rng, n_rep, settings, candidates, bos)
            else:
                n_rep = int(round(settings.batch_size * settings.repeat_share))
                pairs = (_repeat_batch(rng, n_rep, settings, candidates, bos)
                         + _babi_batch(rng, settings.batch_size - n_rep, tokenizer, answer_ids,
                                       settings.uniform_actor_questions))
            ids, mask, attn = _collate(pairs, pad)
            is_repeat = torch.arange(len(pairs)) < n_rep
            loss = _loss(model, ids, _weights(mask, is_repeat, settings.repeat_weight), attn)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % settings.log_every == 0 or step == total - 1:
                rec = {"step": step, "loss": round(loss.item(), 4),
                       "seconds": round(time.time() - t0, 1)}
                history.append(rec)
                log.info("step %d loss %.4f (%.0f s)", step, loss.item(), time.time() - t0)
    model.eval()
    record = {"settings": recipe(settings), "history": history,
              "train_seconds": round(time.time() - t0, 1),
              "n_parameters": sum(p.numel() for p in model.parameters())}
    if out_dir is not None:
        save_tiny(model, tokenizer, out_dir, record)
    return {"model": model, "tokenizer": tokenizer, "record": record}


def save_tiny(model, tokenizer, out_dir: str | Path, record: dict) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.set_attn_implementation("sdpa")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")


HELD_OUT_SEED = 10_000  # generated evaluation stories; training draws from its own stream


def describe(model, tokenizer, n_stories: int = 1000) -> dict:
    """Measured facts for the model card: held-out accuracy, head scores, ablation effects."""
    from ih_sweep.ablation.hooks import ablate_heads
    from ih_sweep.config.schema import EvalConfig
    from ih_sweep.evaluation.evaluator import evaluate
    from ih_sweep.heads.scoring import score_heads, score_matrix
    from ih_sweep.heads.selection import select_heads

    items = babi.make_items(babi.generate_stories(n_stories, HELD_OUT_SEED), "last")
    settings = EvalConfig(progress=False)

    def accuracy(heads) -> float:
        with ablate_heads(model, heads):
            res = evaluate(model, tokenizer, items, settings)
        return sum(r.correct for r in res) / len(res)

    with eager_attention(model):
        scores = score_heads(model, tokenizer, ScoringConfig(), "tiny")
    mat = score_matrix(scores, "prefix")
    facts: dict = {"held_out_accuracy": accuracy([]), "n_held_out": len(items),
                   "n_prefix_ge_0.5": int((mat >= 0.5).sum()),
                   "scores": scores[["layer", "head", "prefix", "copying"]].round(4)
                   .to_dict("records"), "ablation": {}}
    for n in (4, 8, 16):
        facts["ablation"][n] = {c: accuracy(select_heads(mat, c, n)) for c in ("high", "low")}
    strong = [(int(la), int(h)) for la, h in zip(*((mat >= 0.5).nonzero()))]
    facts["ablate_prefix_ge_0.5"] = {"heads": strong, "accuracy": accuracy(strong)}
    return facts


def model_card(record: dict, facts: dict) -> str:
    s = record["settings"]
    top = sorted(facts["scores"], key=lambda r: -r["prefix"])[:12]
    lines = [
        "# ih_sweep tiny model",
        "",
        "A small Mistral-architecture causal LM (transformers `MistralForCausalLM`) with a",
        "word-level tokenizer, trained by `ih-sweep job=train_tiny` so that the",
        "induction-head ablation sweep means something offline on a CPU.",
        "",
        "## Architecture",
        f"- {s['layers']} layers, hidden {s['hidden']}, MLP {s['intermediate']}, "
        f"{s['heads']} query heads and {s['kv_heads']} key/value heads (grouped-query "
        f"attention), head_dim {s['head_dim']}; {record['n_parameters']:,} parameters.",
        "- Vocabulary: 4 special tokens, every word of bAbI task-1 prompts (newline is the token "
        f"`{NEWLINE}`), and {N_FILLER} filler words `w000`..`w255` for random sequences.",
        "",
        "## Training recipe",
        f"- Seed {s['seed']}, {s['threads']} torch thread(s), AdamW lr {s['lr']}, weight decay "
        f"{s['weight_decay']}, batch {s['batch_size']}, 100-step linear warm-up then cosine.",
        f"- Phase 1 ({s['warmup_steps']} steps): [BOS] + R repeated {s['repeat_count'][0]}-"
        f"{s['repeat_count'][1]} times, |R| in {s['repeat_len'][0]}-{s['repeat_len'][1]}, "
        "loss on repeats 2.. only; only "
        f"{s['warmup_active_heads']} randomly chosen heads per layer active (the rest zeroed at "
        "the o_proj input) so that induction concentrates in few heads.",
        f"- Phase 2 ({s['task_steps']} steps): {int(s['repeat_share'] * 100)}% repeated "
        "sequences, the rest generated qa1 prompts (the notebook's format) with loss on the answer "
        f"words only; loss = answer-token mean + {s['repeat_weight']} x repeat-token mean. The "
        f"warm-up head mask stays on for the first {s['task_masked_steps']} of these steps, then "
        "every head trains.",
        f"- Learning rate: {s['lr']} in phase 1, {s['task_lr'] or s['lr']} in phase 2, schedule "
        f"`{s['schedule']}` (wsd: constant, then linear decay over the last "
        f"{int(100 * s['decay_frac'])}% of all steps).",
        f"- Wall time: {record['train_seconds']:.0f} s on this machine (2-core CPU).",
        "",
        "## Measured",
        f"- Greedy accuracy, last question, {facts['n_held_out']} held-out generated stories "
        f"(seed {HELD_OUT_SEED}), the notebook's prompt and `contains` metric: "
        f"{100 * facts['held_out_accuracy']:.1f}%.",
        f"- Heads with prefix-matching score >= 0.5: {facts['n_prefix_ge_0.5']}; ablating all "
        f"of them ({facts['ablate_prefix_ge_0.5']['heads']}) gives "
        f"{100 * facts['ablate_prefix_ge_0.5']['accuracy']:.1f}%.",
        "",
        "| N | top-N ablated | layer-matched lowest-N ablated |",
        "|---|---|---|",
    ]
    for n, acc in facts["ablation"].items():
        lines.append(f"| {n} | {100 * acc['high']:.1f}% | {100 * acc['low']:.1f}% |")
    lines += ["", "Top heads by prefix matching (16 sequences, |R| = 25, 4 repeats):", "",
              "| layer | head | prefix | copying |", "|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['head']} | {r['prefix']:.3f} | {r['copying']:.3f} |"
              for r in top]
    lines += ["", "All per-head scores are in `training.json` (`facts.scores`).", "",
              "## Retrain", "",
              "```", "ih-sweep job=train_tiny train.out_dir=ih_sweep/assets/tiny",
              "```", "",
              "Runs with other thread counts are not bit-identical; the recipe fixes "
              "`train.threads`.", ""]
    return "\n".join(lines)


def train_and_describe(settings: TrainConfig, out_dir: str | Path) -> dict:
    """Train, measure, and write weights + tokenizer + training.json + README.md (card)."""
    from ih_sweep.io_utils import write_json, write_text

    run = train_tiny(settings)
    model, tokenizer, record = run["model"], run["tokenizer"], run["record"]
    facts = describe(model, tokenizer)
    record["facts"] = facts
    save_tiny(model, tokenizer, out_dir, record)
    write_json(Path(out_dir) / "training.json", record)
    write_text(Path(out_dir) / "README.md", model_card(record, facts))
    log.info("tiny model written to %s: accuracy %.3f, %d heads >= 0.5", out_dir,
             facts["held_out_accuracy"], facts["n_prefix_ge_0.5"])
    return {"out_dir": str(out_dir), "accuracy": facts["held_out_accuracy"],
            "n_prefix_ge_0.5": facts["n_prefix_ge_0.5"], "ablation": facts["ablation"]}

"""Small random-weight models of every supported family, shared by the tests that run them
(model/test_families.py, heads/test_function_vectors.py, pipeline/test_dose.py,
report/test_cross_model.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf

from ih_sweep.model.loading import ASSET_DIR

V = 296  # the tiny tokenizer's vocabulary
SPECIAL = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
ROPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, **SPECIAL)


def family_configs() -> dict[str, tf.PretrainedConfig]:
    """One small config per supported family (README: supported families)."""
    return {
        "llama": tf.LlamaConfig(**ROPE),
        "mistral": tf.MistralConfig(**{**ROPE, "head_dim": 16}),  # heads*head_dim != hidden
        "qwen2": tf.Qwen2Config(**ROPE),
        "qwen3": tf.Qwen3Config(**{**ROPE, "head_dim": 8}),
        "phi3": tf.Phi3Config(**ROPE),
        "gemma": tf.GemmaConfig(**{**ROPE, "head_dim": 8}),
        "gemma2": tf.Gemma2Config(**{**ROPE, "head_dim": 8, "sliding_window": 16}),
        "gemma3": tf.Gemma3TextConfig(**{**ROPE, "head_dim": 8, "sliding_window": 16,
                                         "final_logit_softcapping": 5.0}),
        "gpt2": tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **SPECIAL),
        "gpt_neox": tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=512,
                                     **SPECIAL),
        "opt": tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                            num_attention_heads=4, word_embed_proj_dim=32,
                            max_position_embeddings=512, **SPECIAL),
        "opt350m": tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                num_attention_heads=4, word_embed_proj_dim=16,
                                do_layer_norm_before=False, max_position_embeddings=512,
                                **SPECIAL),
    }


CONFIGS = family_configs()


def save_model(config, folder: Path, seed: int = 0) -> Path:
    """A random-weight model of ``config`` and the tiny tokenizer in ``folder``. Norm
    weights are drawn too (not all ones), so that a norm left off a path shows."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSET_DIR / name, folder / name)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine a second
    spinning thread costs far more than it gains."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

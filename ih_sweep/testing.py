"""Reference implementations used only by tests and benchmarks to check the pipeline.

Each computes something the pipeline computes, by a second mechanism or the slow obvious
way, so that tests can compare the two. Nothing in the sweep imports this module.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch

from ih_sweep.ablation.hooks import ablate_heads, heads_by_layer
from ih_sweep.heads.scoring import copying_from_logits
from ih_sweep.model.architecture import head_sites, hook_z
from ih_sweep.pipeline.head_scan import Probe, probe_readout


@contextmanager
def zero_attention_probs(model, heads: Sequence[tuple[int, int]]) -> Iterator[None]:
    """A second mechanism for the same ablation: zero the heads' attention probabilities.

    Eager attention recomputed with the selected heads' probability rows set to zero, via
    transformers' AttentionInterface. Used to check the o_proj hook, not in the sweep.
    """
    from transformers import AttentionInterface
    from transformers.models.llama.modeling_llama import eager_attention_forward, repeat_kv

    sites = head_sites(model)
    by_layer = heads_by_layer(sites, heads)
    layer_of = {id(layer.self_attn): i for i, layer in enumerate(sites.layers)}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        _, weights = eager_attention_forward(module, query, key, value, attention_mask,
                                             scaling=scaling, dropout=0.0, **kw)
        layer = layer_of[id(module)]
        if by_layer.get(layer):
            weights = weights.clone()
            weights[:, by_layer[layer]] = 0
        v = repeat_kv(value, module.num_key_value_groups)
        out = torch.matmul(weights, v).transpose(1, 2).contiguous()
        return out, weights

    name = "ih_sweep_zero_probs"
    AttentionInterface.register(name, attention)
    # a custom attention name gets no causal mask unless a mask function is registered too
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionMaskInterface.register(name, eager_mask)
    from ih_sweep.model.architecture import attention_implementation

    with attention_implementation(model, name):
        yield


@torch.no_grad()
def copying_by_brute_force(model, tokens: torch.Tensor) -> np.ndarray:
    """[layers, heads] copying scores of ``tokens`` ([BOS] + a sequence per row), computed
    head by head with the full-vocabulary logits of the head's direct path.

    Llama-family layout (``model.model.layers[i].self_attn.o_proj``, ``model.model.norm``,
    ``model.lm_head``) and eager attention. Direct path through the head's W_O columns, the
    final norm and the unembedding; the vocabulary mean taken over all logits explicitly.
    """
    sites = head_sites(model)
    hd = sites.head_dim
    store = {}
    with hook_z(sites, lambda i, z: store.__setitem__(i, z)):
        out = model(input_ids=tokens, output_attentions=True)
    scores = np.zeros((sites.n_layers, sites.heads_per_layer))
    for layer in range(sites.n_layers):
        w = model.model.layers[layer].self_attn.o_proj.weight  # [hidden, heads*dim]
        for head in range(sites.heads_per_layer):
            sl = slice(head * hd, (head + 1) * hd)
            z = store[layer][..., sl]  # [b, T, hd]
            direct = z @ w[:, sl].T
            logits = model.lm_head(model.model.norm(direct))[:, 1:]  # [b, q, V]
            attn = out.attentions[layer][:, head, 1:]  # [b, q, T]
            att_tok = torch.gather(tokens, 1, attn.argmax(-1))
            vals = []
            for b in range(tokens.shape[0]):
                uniq = torch.unique(tokens[b, 1:])
                lg = logits[b]
                mean = lg.mean(-1)
                vals.append(copying_from_logits(mean, lg.gather(1, att_tok[b][:, None])[:, 0],
                                                lg[:, uniq]))
            scores[layer, head] = torch.cat(vals).mean().item()
    return scores


@torch.no_grad()
def scan_by_full_reruns(model, probes: dict[str, Probe],
                        heads: Sequence[tuple[int, int]]) -> pd.DataFrame:
    """:func:`ih_sweep.pipeline.head_scan.exact_scan`'s effects the obvious way: for each
    head, one full
    forward pass of every probe with that head zeroed (:func:`ablate_heads`)."""
    device = next(model.parameters()).device

    def readout(probe: Probe, ablated) -> tuple[float, float]:
        with ablate_heads(model, ablated):
            lg = model(input_ids=probe.ids.to(device),
                       attention_mask=probe.mask.to(device)).logits
        pos = probe.pos.to(device)
        lg = torch.gather(lg, 1, pos[..., None].expand(-1, -1, lg.shape[-1]))
        lp, hit = probe_readout(lg, probe)
        v = probe.valid.to(device)
        return float((lp[0] * v).sum() / v.sum()), float((hit[0] & v).sum() / v.sum())

    rows = {(la, h): {"layer": la, "head": h} for la, h in heads}
    for name, probe in probes.items():
        base_lp, base_acc = readout(probe, [])
        for la, h in heads:
            lp, acc = readout(probe, [(la, h)])
            if name == "babi":
                rows[(la, h)]["d_accuracy"] = acc - base_acc
                rows[(la, h)]["d_logprob"] = lp - base_lp
            else:
                rows[(la, h)]["d_repeat_loss"] = base_lp - lp
    return pd.DataFrame(list(rows.values()))


@torch.no_grad()
def generate_one_at_a_time(model, tokenizer, item, max_new_tokens: int = 3,
                           stop: Sequence[str] = ()) -> str:
    """The notebook's method for one item: ``model.generate`` on the prompt alone, greedy
    (the reference the evaluator's outcomes must equal). With ``stop``, generation ends once
    the decoded new text holds a stop string, and the text is cut before it, one string after
    the other as lm-eval's ``postprocess_generated_text`` does (``text.split(s)[0]``).
    (transformers' own ``stop_strings`` cannot read a word-level vocabulary such as the tiny
    model's: its ``StopStringCriteria`` looks for a probe text the tokenizer maps to [UNK].)
    Its one row holds the item's story (:func:`ih_sweep.ablation.hooks.sequence_keys`, for
    resample ablation)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    from ih_sweep.ablation.hooks import sequence_keys
    from ih_sweep.evaluation.decoding import cut_at_eos, decode, model_device
    from ih_sweep.evaluation.rows import encode
    from ih_sweep.model.tokens import pad_id

    device = model_device(model)
    enc = torch.tensor([encode(tokenizer, item.prompt)], device=device)
    start = enc.shape[1]

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            text = decode(tokenizer, input_ids[0, start:].tolist())
            done = any(s in text for s in stop)
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool,
                              device=input_ids.device)

    criteria = StoppingCriteriaList([StopAfter()]) if stop else None
    with sequence_keys(model, [item.story_index]):
        out = model.generate(enc, max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1, pad_token_id=pad_id(tokenizer), temperature=None,
                             top_p=None, top_k=None, stopping_criteria=criteria)
    text = decode(tokenizer, cut_at_eos(out[0, start:].tolist(), tokenizer.eos_token_id))
    for s in stop:
        text = text.split(s)[0]
    return text

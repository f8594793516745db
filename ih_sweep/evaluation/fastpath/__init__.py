"""Attention for the evaluator's teacher-forced pass: the same outputs where they are read,
with less work.

Two facts of that pass make work skippable:

* Its rows are right-padded, so causality alone keeps every real query away from padding:
  no padding mask is needed. On CPU the causal triangle is then computed in query blocks
  (PyTorch's CPU flash kernel computes the whole square for prompts under 512 tokens).
* Only a few positions per row are read (each prompt's last token and the teacher tokens
  after it). In the last layer nothing else depends on the other positions, so only those
  queries are computed; the rest get zeros, which nothing reads. For the Llama-family decoder
  layer (Llama, Mistral, Qwen2) the whole last layer runs at the read positions (keys and
  values still at all of them); other families restrict only its attention. On a 2-layer
  model that is half the work; on a 32-layer model ~3% of it.

In the other Llama-family layers the attention module's forward is this module's too: the
rotary embedding is applied on the projections' own [B, T, heads, D] layout with fewer passes
(:func:`rotate`) and the causal attention is called directly (4-6% of the tiny model's
evaluation time).

:func:`fast_attention` installs this once per evaluation; only passes inside :func:`read_at`
(per thread: :func:`ih_sweep.model.forward.reading`) take the shortcuts, every other call
on the model is the plain one. Batches evaluated in several threads at once therefore share
one installation.

Keys may begin with a cached prefix shared by every row (no padding in it): query i then sits
at key position ``offset + i``. Which calls take a shortcut is decided by allow-lists
(:func:`_fits`, :func:`_takes_shortcut`): only calls whose keyword arguments, shapes and module
state are all in the handled set; anything else (dropout, training mode, a sliding window
shorter than the row, softcapping, attention sinks, position biases, a non-causal module, a
keyword this module does not know) goes to transformers' sdpa / the layer's own forward
unchanged.

The two parts differ in what they rely on. The AttentionInterface function is transformers'
public extension point (switched to with ``set_attn_implementation``, see
:func:`ih_sweep.model.attention.attention_implementation`). The patched layer forwards are copies of
transformers' Llama-family internals (decoder layer and attention forward, their keyword
arguments, ``apply_rotary_pos_emb``). Both are on, by default, only where the installed
transformers is a release the tests cover (:data:`TESTED_TRANSFORMERS`, pyproject.toml's
range; elsewhere the plain forward, with one line saying so); see :func:`parts_wanted`.

Across evaluations of the same items in one process (a sweep's conditions, a null's draws),
the Llama-family layers below the first one an ablation touches are computed once per batch
and then taken from the model's store, exactly (:mod:`.reuse`, ``eval.layer_store_mb``).

Modules: :mod:`.kernel` (the AttentionInterface function, the causal blocks), :mod:`.layers`
(the Llama-family layer patch), :mod:`.reuse` (the store of untouched layers' outputs),
:mod:`.gate` (the transformers version range, :func:`parts_wanted`), :mod:`.install`
(installing it, asking for it on a pass), :mod:`.check` (the run-time self-check against the
plain path), :mod:`.logits` (logits at chosen positions of whole rows through all of it: the
mechanism check's passes).
"""

from ih_sweep.evaluation.fastpath.gate import TESTED_TRANSFORMERS, parts_wanted, tested_range
from ih_sweep.evaluation.fastpath.install import (
    FastPath,
    fast_attention,
    installed,
    read_at,
    read_only_at,
)
from ih_sweep.evaluation.fastpath.kernel import NAME, attention, causal, selected_queries
from ih_sweep.evaluation.fastpath.layers import attention_at_all, last_layer_at, rotate

__all__ = ["NAME", "TESTED_TRANSFORMERS", "FastPath", "attention", "attention_at_all", "causal",
           "fast_attention", "installed", "last_layer_at", "parts_wanted", "read_at",
           "read_only_at", "rotate", "selected_queries", "tested_range"]

"""Switching a model's attention implementation (transformers' ``set_attn_implementation``)
for a while, sub-models included, with a one-line error where the switch does not take."""

from __future__ import annotations

from ih_sweep.model.shape import UnsupportedArchitecture


class AttentionSwitchError(UnsupportedArchitecture):
    """The model cannot switch its attention implementation (transformers'
    ``set_attn_implementation`` left it unchanged, or the model has no such method)."""


def implementations(config):
    """``config``'s attention implementation and its sub-configs', in the format
    ``set_attn_implementation`` takes back (a str, or a dict with ``""`` for the config itself
    and one entry per sub-config), so a restore gives each sub-model its own again."""
    subs = {}
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            subs[key] = implementations(sub)
    own = config._attn_implementation
    return {"": own, **subs} if subs else own


_UNCHANGED = object()


class attention_implementation:  # named as a function: it is used like a contextmanager
    """``with attention_implementation(model, name):`` -- ``model`` on attention
    implementation ``name`` (``"eager"``, ``"sdpa"`` or a name registered with transformers'
    ``AttentionInterface``) while inside, through transformers' public
    ``set_attn_implementation`` (the model and every sub-model); the previous
    implementation(s), sub-configs' included, are put back on exit, also on an exception.

    Raises :class:`AttentionSwitchError` on entry where the switch does not take: models whose
    attention does not go through ``AttentionInterface`` (transformers then only logs a
    warning and changes nothing), or objects without ``set_attn_implementation``. A name
    transformers does not know raises its own ``ValueError``. Nothing changes (and nothing
    is checked) when the model is on ``name`` already."""

    def __init__(self, model, name: str):
        self.model = model
        self.name = name
        self._previous = _UNCHANGED

    def __enter__(self) -> None:
        model, name = self.model, self.name
        setter = getattr(model, "set_attn_implementation", None)
        if setter is None:
            raise AttentionSwitchError(
                f"{type(model).__name__} has no set_attn_implementation: cannot switch its "
                f"attention to {name!r} (a transformers>=5 PreTrainedModel is needed)")
        previous = implementations(model.config)
        if previous == name:
            return
        self._previous = previous
        try:
            setter(name)
            text = model.config.get_text_config(decoder=True)
            now = (model.config._attn_implementation, text._attn_implementation)
            if now != (name, name):
                raise AttentionSwitchError(
                    f"{type(model).__name__} cannot switch its attention to {name!r} (it stays "
                    f"{now[1]!r}): its attention does not go through transformers' "
                    "AttentionInterface")
        except BaseException:
            self._restore()
            raise

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        previous, self._previous = self._previous, _UNCHANGED
        if previous is not _UNCHANGED:
            self.model.set_attn_implementation(previous)

"""The model-structure names under their earlier module (kept so existing imports work).

New code imports from where each lives: :mod:`.sites` (HeadSites, head_sites, hook_z, W_O,
linear-layer helpers), :mod:`.positions` (token positions), :mod:`.attention` (the attention
implementation switch), :mod:`.shape` (config shape, UnsupportedArchitecture), and
:mod:`.forward` (the forward-pass context).
"""

from __future__ import annotations

from ih_sweep.model.attention import AttentionSwitchError, attention_implementation
from ih_sweep.model.positions import (
    PositionsUnknown,
    current_positions,
    positions_from_mask,
    token_positions,
    track_positions,
)
from ih_sweep.model.shape import (
    SUPPORTED,
    UnsupportedArchitecture,
    config_shape,
    position_limit,
    text_config,
)
from ih_sweep.model.sites import (
    HeadSites,
    ZHook,
    head_sites,
    hook_z,
    linear_in_features,
    linear_out_features,
    linear_weight,
)

__all__ = ["SUPPORTED", "AttentionSwitchError", "HeadSites", "PositionsUnknown",
           "UnsupportedArchitecture", "ZHook", "attention_implementation", "config_shape",
           "current_positions", "head_sites", "hook_z", "linear_in_features",
           "linear_out_features", "linear_weight", "position_limit", "positions_from_mask",
           "text_config", "token_positions", "track_positions"]

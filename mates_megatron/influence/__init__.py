"""Data influence model: text -> predicted oracle score, behind one interface (``InfluenceModel``) with
implementations registered by name (``INFLUENCE_MODELS``: 'finetune', 'ridge', 'relational'), run by ``InfluenceRunner``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

# The built-in models register themselves on import (registry.INFLUENCE_MODELS).
from mates_megatron.influence import finetune as _finetune  # noqa: F401
from mates_megatron.influence import relational as _relational  # noqa: F401
from mates_megatron.influence import ridge as _ridge  # noqa: F401
from mates_megatron.influence.base import InfluenceModel
from mates_megatron.influence.registry import INFLUENCE_MODELS

if TYPE_CHECKING:
    from mates_megatron.influence.config import InfluenceConfig

# The registry is a leaf (InfluenceConfig checks names in it, and the base imports the config), so its base is
# set here, where both are imported: models registered from now on (selection.imports) are checked too.
INFLUENCE_MODELS.require_base(InfluenceModel)


def build_influence_model(
    cfg: InfluenceConfig, *, device: str | torch.device | None = None
) -> InfluenceModel:
    """The influence model ``cfg.model`` names; ``device`` is the training device (``cfg.device`` wins)."""
    return INFLUENCE_MODELS.get(cfg.model)(cfg, device=device)

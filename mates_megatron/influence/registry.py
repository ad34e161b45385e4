"""Influence models by name (``InfluenceConfig.model``)."""

from __future__ import annotations

import torch

from mates_megatron.influence.base import InfluenceModel
from mates_megatron.influence.config import InfluenceConfig
from mates_megatron.influence.finetune import FinetuneInfluenceModel
from mates_megatron.influence.ridge import RidgeInfluenceModel
from mates_megatron.registry import Registry

INFLUENCE_MODELS: Registry[type[InfluenceModel]] = Registry("influence model")
"""Registered influence models; a new one is a subclass of ``InfluenceModel`` in its own file, registered
here or from a module in ``selection.imports``."""
INFLUENCE_MODELS.register("finetune")(FinetuneInfluenceModel)
INFLUENCE_MODELS.register("ridge")(RidgeInfluenceModel)


def build_influence_model(
    cfg: InfluenceConfig, *, device: str | torch.device | None = None
) -> InfluenceModel:
    """The influence model ``cfg.model`` names; ``device`` is the training device (``cfg.device`` wins)."""
    return INFLUENCE_MODELS.get(cfg.model)(cfg, device=device)

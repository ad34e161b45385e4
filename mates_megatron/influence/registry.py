"""Influence models by name (``InfluenceConfig.model``).

A leaf: the registry alone. Each model registers itself in its own module (``finetune``, ``ridge``), which
the package imports, so that ``InfluenceConfig`` can check a name here without importing the models (they
import the config).
"""

from __future__ import annotations

from mates_megatron.registry import Registry

INFLUENCE_MODELS: Registry[type] = Registry("influence model")
"""Registered influence models (``InfluenceModel`` subclasses); a new one is a subclass in its own file,
registered with ``@INFLUENCE_MODELS.register(name)`` from a module in ``selection.imports``."""

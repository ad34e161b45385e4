"""megatron-core optimizers as a list, whether or not they are chained."""

from __future__ import annotations


def megatron_optimizers(optimizer) -> list:
    """The optimizers inside a megatron-core ChainedOptimizer (or the optimizer itself)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))

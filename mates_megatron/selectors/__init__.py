"""Selectors: choose k of a round's candidates; one interface (``Selector``), registered by name in
``SELECTORS``. Each selector registers in its own module; importing the package registers them all."""

from mates_megatron.selectors.base import SELECTORS, Selector
from mates_megatron.selectors.basic import GumbelTopKSelector, RandomSelector, TopKSelector
from mates_megatron.selectors.group import ClusterGreedySelector
from mates_megatron.selectors.importance import ImportanceResamplingSelector
from mates_megatron.selectors.mixture import MixtureSelector

__all__ = [
    "SELECTORS",
    "ClusterGreedySelector",
    "GumbelTopKSelector",
    "ImportanceResamplingSelector",
    "MixtureSelector",
    "RandomSelector",
    "Selector",
    "TopKSelector",
]

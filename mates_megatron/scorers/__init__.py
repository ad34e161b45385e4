"""Scorers registered by name (``selection.scorer``); see ``base.Scorer`` for the contract."""

from mates_megatron.scorers import classifier as _classifier  # noqa: F401  (registers 'classifier')
from mates_megatron.scorers import dsir as _dsir  # noqa: F401  (registers 'dsir')
from mates_megatron.scorers import gotd as _gotd  # noqa: F401  (registers 'gotd')
from mates_megatron.scorers import group_mates as _group_mates  # noqa: F401  (registers 'group_mates')
from mates_megatron.scorers import lava as _lava  # noqa: F401  (registers 'lava')
from mates_megatron.scorers import lookalike as _lookalike  # noqa: F401  (registers 'lookalike')
from mates_megatron.scorers import mates as _mates  # noqa: F401  (registers 'mates')
from mates_megatron.scorers import values as _values  # noqa: F401  (registers 'values')
from mates_megatron.scorers.base import SCORERS, NoScorer, RoundInput, Scorer, Scores

__all__ = ["SCORERS", "NoScorer", "RoundInput", "Scorer", "Scores"]

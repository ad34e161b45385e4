"""Candidate pools registered by name (``selection.pool``); see ``base.CandidatePool`` for the protocol."""

from mates_megatron.pool import energon_pool as _energon  # noqa: F401  (registers 'energon'; lazy import)
from mates_megatron.pool import indexed_pool as _indexed  # noqa: F401  (registers 'indexed')
from mates_megatron.pool import webdataset_pool as _webdataset  # noqa: F401  (registers 'webdataset')
from mates_megatron.pool.base import POOLS, CandidatePool, PoolError, PoolRounds

__all__ = ["POOLS", "CandidatePool", "PoolError", "PoolRounds"]

"""Selectors: choose k of a round's candidates. One interface, registered by name in ``SELECTORS``.

Contract: ``select(candidates, k, *, scores, seed, round_) -> int32 ids``: k distinct ids from
``candidates``, deterministic for (seed, round_) and identical on every rank. Scores are lower-is-better
(an oracle or predicted reference loss). ``needs_scores`` says whether the round must run a scorer first:
a selector that ignores scores (random) runs with none, so a score-free control needs no model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mates_megatron.component import Component
from mates_megatron.registry import Registry

if TYPE_CHECKING:
    from mates_megatron.pool.base import CandidatePool


class Selector(Component, ABC):
    """Base class: subclass, set ``needs_scores``, implement ``select``, register in ``SELECTORS``."""

    needs_scores: ClassVar[bool] = False
    """Whether ``select`` reads scores (then the round runs its scorer first)."""
    needs_features: ClassVar[bool] = False
    """Whether ``select`` reads the candidates' embeddings (``features=``, from the scorer's ``Scores``)."""
    lazy_scores: ClassVar[bool] = False
    """Whether ``select`` takes ``scores`` as a callable from positions to scores (reading only the positions
    it works on), as a scorer with ``gives_lazy_scores`` gives them."""
    draws_every_round: ClassVar[bool] = False
    """Whether the hook draws round 0 and the rounds of a score-free run with this selector too (a uniform
    draw otherwise)."""
    collective: ClassVar[bool] = False
    """Whether ``select`` spreads its work over a process group (``group=``: the hook passes a gloo group of the
    world, and every rank calls it at the same step); it must select the same set whatever the group's size."""
    built_on_pool: ClassVar[bool] = False
    """Whether ``build`` reads the pool (e.g. 'mixture', which reads the candidates' domains)."""

    @classmethod
    def build(cls, config: Any, *, seed: int, pool: CandidatePool | None = None) -> Selector:
        """The selector on its options (``config``: its ``Config``, None when it takes none): by default
        ``cls(**fields of config)``; override for selectors built from more (declare ``built_on_pool``)."""
        return cls() if config is None else cls(**asdict(config))

    @abstractmethod
    def select(
        self, candidates: np.ndarray, k: int, *, scores: np.ndarray | None, seed: int, round_: int
    ) -> np.ndarray: ...

    def select_with_record(
        self, candidates: np.ndarray, k: int, **kw: Any
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """``select`` and what the selector did (JSON-ready numbers, kept in the round's record under
        'selector'); by default nothing."""
        return self.select(candidates, k, **kw), {}


def check_selection(candidates: np.ndarray, k: int, scores: np.ndarray | None, needs_scores: bool) -> None:
    if not 0 < k <= len(candidates):
        raise ValueError(
            f"cannot select k={k} of {len(candidates)} candidates; k must be in [1, {len(candidates)}]"
        )
    if needs_scores:
        if scores is None or len(scores) != len(candidates):
            raise ValueError("this selector needs one score per candidate")
        bad = ~np.isfinite(scores)
        if bad.any():
            raise ValueError(
                f"{int(bad.sum())} candidate scores are NaN or infinite (first at candidate id "
                f"{int(candidates[np.flatnonzero(bad)[0]])}); fix the scorer before selecting"
            )


def selection_rng(seed: int, round_: int) -> np.random.Generator:
    return np.random.default_rng([seed, round_, 0x5E1EC7])


SELECTORS: Registry[type[Selector]] = Registry("selector", base=Selector)
"""Every selector by name; each registers in its own module of this package."""

"""Selectors: choose k of a round's candidates. One interface, registered by name in ``SELECTORS``.

Contract: ``select(candidates, k, *, scores, seed, round_) -> int32 ids``: k distinct ids from
``candidates``, deterministic for (seed, round_) and identical on every rank. Scores are lower-is-better
(an oracle or predicted reference loss). ``needs_scores`` says whether the round must run a scorer first:
a selector that ignores scores (random) runs with none, so a score-free control needs no model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from mates_megatron.registry import Registry


class Selector(Protocol):
    needs_scores: ClassVar[bool]
    """Whether ``select`` reads scores (then the round runs its scorer first)."""

    def select(
        self, candidates: np.ndarray, k: int, *, scores: np.ndarray | None, seed: int, round_: int
    ) -> np.ndarray: ...


def _check(candidates: np.ndarray, k: int, scores: np.ndarray | None, needs_scores: bool) -> None:
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


def _rng(seed: int, round_: int) -> np.random.Generator:
    return np.random.default_rng([seed, round_, 0x5E1EC7])


SELECTORS: Registry[type] = Registry("selector")


@SELECTORS.register("random")
@dataclass(frozen=True)
class RandomSelector:
    """Uniform sample of k candidates without replacement (the baseline)."""

    needs_scores: ClassVar[bool] = False

    def select(self, candidates, k, *, scores=None, seed, round_):
        _check(candidates, k, scores, needs_scores=False)
        pick = _rng(seed, round_).choice(len(candidates), size=k, replace=False, shuffle=False)
        return np.asarray(candidates, dtype=np.int32)[np.sort(pick)]


@SELECTORS.register("topk")
@dataclass(frozen=True)
class TopKSelector:
    """The k lowest scores (ties broken by candidate id)."""

    needs_scores: ClassVar[bool] = True

    def select(self, candidates, k, *, scores, seed=0, round_=0):
        _check(candidates, k, scores, needs_scores=True)
        order = np.lexsort((candidates, scores))
        return np.asarray(candidates, dtype=np.int32)[np.sort(order[:k])]


@SELECTORS.register("gumbel")
@dataclass(frozen=True)
class GumbelTopKSelector:
    """MATES: keep the k lowest of ``z(score) / temperature - G``, G ~ Gumbel(0, 1) i.i.d.

    Gumbel-top-k draws k candidates without replacement with probabilities ``softmax(-z / temperature)``
    (the first pick is exactly that softmax). Scores are lower-is-better, so the noise is *subtracted*:
    adding it, as the reference implementation does, favours the worst candidates as temperature grows.

    Scale: with ``standardize`` (default) the temperature applies to the scores z-scored within the round,
    so it means the same whatever the influence model's spread; an influence model whose predictions vary
    by a few thousandths would otherwise be drowned by unit-scale Gumbel noise (near-random selection).
    """

    temperature: float = 0.5
    standardize: bool = True
    needs_scores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(
                f"GumbelTopKSelector.temperature={self.temperature} must be >= 0 (0 = exact top-k)"
            )

    def select(self, candidates, k, *, scores, seed, round_):
        _check(candidates, k, scores, needs_scores=True)
        s = np.asarray(scores, dtype=np.float64)
        if self.standardize:
            std = s.std()
            s = (s - s.mean()) / (std if std > 0 else 1.0)
        if self.temperature == 0:
            return TopKSelector().select(candidates, k, scores=s)
        gumbel = _rng(seed, round_).gumbel(size=len(s))
        keys = s / self.temperature - gumbel
        order = np.argpartition(keys, k - 1)[:k]
        return np.sort(np.asarray(candidates, dtype=np.int32)[order])


# The mixture selector lives with the mixture planners; importing it here registers it with the others.
import mates_megatron.mixture.selector  # noqa: E402,F401

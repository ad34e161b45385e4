"""Selectors: choose k of a round's candidates. One interface, registered by name in ``SELECTORS``.

Contract: ``select(candidates, k, *, scores, seed, round_) -> int32 ids``: k distinct ids from
``candidates``, deterministic for (seed, round_) and identical on every rank. Scores are lower-is-better
(an oracle or predicted reference loss). ``needs_scores`` says whether the round must run a scorer first:
a selector that ignores scores (random) runs with none, so a score-free control needs no model.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import numpy as np

from mates_megatron.registry import Registry


class Selector(Protocol):
    needs_scores: ClassVar[bool]
    """Whether ``select`` reads scores (then the round runs its scorer first)."""

    def select(
        self, candidates: np.ndarray, k: int, *, scores: np.ndarray | None, seed: int, round_: int
    ) -> np.ndarray: ...


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


SELECTORS: Registry[type] = Registry("selector")
"""Every selector by name; each registers in its own module of this package."""

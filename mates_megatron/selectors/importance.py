"""DSIR's importance resampling (with the 'dsir' scorer, whose scores are minus log importance weights)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mates_megatron.selectors.base import SELECTORS, Selector
from mates_megatron.selectors.basic import GumbelTopKSelector


@SELECTORS.register("importance")
@dataclass(frozen=True)
class ImportanceResamplingSelector(Selector):
    """DSIR's resampling: keep the k lowest of ``score - G``, G ~ Gumbel(0, 1), on the raw scores.

    With scores = minus log importance weights this draws k candidates without replacement with
    probabilities proportional to the weights (Gumbel-top-k at temperature 1, no z-scoring). It has no
    temperature (it takes no options).
    """

    needs_scores: ClassVar[bool] = True

    def select(self, candidates, k, *, scores, seed, round_):
        return GumbelTopKSelector(temperature=1.0, standardize=False).select(
            candidates, k, scores=scores, seed=seed, round_=round_
        )

"""Precomputed values ('values'): the scores `mates-megatron value` wrote beside the shards, read by
candidate id. Lower = more useful, as every score (LAVA values and GOT-D potentials both are); ``negate:
true`` flips a file whose higher values are better. Nothing is computed in the run, so it needs no warm-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mates_megatron.ot.values_file import read_values
from mates_megatron.scorers.base import SCORERS, RoundInput, Scorer, ScorerContext, Scores


@dataclass
class ValuesConfig:
    path: str = ""
    """The values .npy (``<shards>/values/<name>.npy``)."""
    negate: bool = False
    """Select the highest values first instead."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError(
                "scorer 'values' needs scorer_options.path: the .npy written by `mates-megatron value`"
            )


@SCORERS.register("values")
class ValuesScorer(Scorer):
    needs: ClassVar[frozenset[str]] = frozenset()
    Config = ValuesConfig

    def __init__(
        self, config: ValuesConfig | None = None, *, context: ScorerContext | None = None, **_: Any
    ) -> None:
        super().__init__(config, context=context)
        self._values: np.ndarray | None = None

    def score(self, r: RoundInput) -> Scores:
        if self._values is None:
            self._values, meta = read_values(self.config.path, r.pool)
            self._meta = {k: meta.get(k) for k in ("method", "reference_sha256")}
        v = np.asarray(self._values[np.asarray(r.candidates)], dtype=np.float64)
        return Scores(-v if self.config.negate else v, {"values": self._meta})

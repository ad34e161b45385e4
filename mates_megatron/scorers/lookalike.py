"""The look-alike baseline ('lookalike'): candidates nearest to the reference in the influence encoder's
embedding, score = minus the mean cosine similarity to the ``k`` nearest reference examples. What GOT-D is
compared against: data that resembles the target, rather than data that moves the distribution toward it.
Use ``selector: topk``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from mates_megatron.encoder import EncoderConfig
from mates_megatron.scorers.base import SCORERS, RoundInput, Scores
from mates_megatron.scorers.embedding import EmbeddingScorer


@dataclass(frozen=True)
class LookalikeConfig(EncoderConfig):
    """Options of the 'lookalike' scorer: the encoder it embeds with (``EncoderConfig``'s fields) and ``k``."""

    k: int = 10
    """Nearest reference examples averaged."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ValueError(f"LookalikeConfig.k={self.k}: set k >= 1")


@SCORERS.register("lookalike")
class LookalikeScorer(EmbeddingScorer):
    Config = LookalikeConfig

    def score(self, r: RoundInput) -> Scores:
        t = time.perf_counter()
        x, y, _ = self.embed(r, scorer="lookalike")
        scores = lookalike_scores(x, y, k=self.config.k, batch_size=self.config.batch_size)
        return Scores(scores, {"seconds": {"score": time.perf_counter() - t}}, features=x)


def lookalike_scores(x: np.ndarray, y: np.ndarray, *, k: int = 10, batch_size: int = 32) -> np.ndarray:
    """Minus the mean cosine similarity of each candidate (unit rows of ``x``) to its ``k`` nearest reference
    rows (unit rows of ``y``; all of them when fewer): the lowest first."""
    k = min(k, len(y))
    scores = np.empty(len(x), dtype=np.float64)
    for lo in range(0, len(x), batch_size):  # in chunks: the similarities of a whole round would be N x M
        sim = x[lo : lo + batch_size] @ y.T  # unit vectors: cosine similarity
        scores[lo : lo + batch_size] = -(-np.partition(-sim, k - 1, axis=1)[:, :k]).mean(1)
    return scores

"""BM25 tracing (rank-bm25's Okapi BM25 over the candidates' text): the lexical baseline.

The query is its whole text (context and target: the fact as stated). Words are lower-cased ``\\w+`` runs,
for documents and queries alike. rank-bm25 keeps the tokenised corpus in memory (one list of words per
document): fine to a few million documents on one host; beyond that, a disk-backed index (Lucene/pyserini)
is the tool, not this baseline.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from mates_megatron.trace.base import TRACERS, TopK, TraceInput, Tracer, TraceResult, chunks

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass
class Bm25Options:
    k1: float = 1.5
    b: float = 0.75


@TRACERS.register("bm25")
class Bm25Tracer(Tracer):
    Config: ClassVar[type] = Bm25Options
    method = "bm25"
    needs_model = False

    def __init__(self, options: Bm25Options | None = None) -> None:
        self.options = options or Bm25Options()

    def trace(self, inp: TraceInput) -> TraceResult:
        try:
            from rank_bm25 import BM25Okapi
        except ImportError as e:  # an optional extra: say how to get it
            raise ImportError(
                "trace --method bm25 needs rank-bm25: pip install 'mates-megatron[trace]'"
            ) from e
        t0 = time.perf_counter()
        corpus = [words(t) for ids in chunks(inp, inp.ids, "bm25 index") for t in _texts(inp.pool, ids)]
        bm25 = BM25Okapi(corpus, k1=self.options.k1, b=self.options.b)
        built = time.perf_counter() - t0
        scores = np.stack([bm25.get_scores(words(q)) for q in inp.queries.texts])
        top = TopK(len(inp.queries), inp.top_k)
        top.add(inp.ids, scores)
        ids, s = top.result()
        return TraceResult(
            ids, s, self.method, record={"seconds": time.perf_counter() - t0, "index_seconds": built}
        )


def _texts(pool, ids: np.ndarray) -> list[str]:
    return [pool.text(int(g)) for g in ids]

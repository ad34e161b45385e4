"""How well a trace finds the documents behind a query: recall@k of a ranking and the F1 of a verdict set.

Per query, then averaged over queries (macro), as FTRACE reports them. A query with an empty verdict set
has precision 0 (nothing right was claimed), not an undefined one that would drop it from the average.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def recall_at_k(ranked: Sequence[int], gold: Iterable[int], k: int) -> float:
    """Share of ``gold`` among the first ``k`` of ``ranked``."""
    gold = set(int(g) for g in gold)
    if not gold:
        raise ValueError("recall_at_k: the query has no gold documents")
    if k < 1:
        raise ValueError(f"recall_at_k: k={k} must be >= 1")
    return len(gold & {int(r) for r in list(ranked)[:k]}) / len(gold)


def precision_recall_f1(predicted: Iterable[int], gold: Iterable[int]) -> tuple[float, float, float]:
    """(precision, recall, F1) of the set ``predicted`` against ``gold``."""
    predicted, gold = {int(p) for p in predicted}, {int(g) for g in gold}
    if not gold:
        raise ValueError("precision_recall_f1: the query has no gold documents")
    hit = len(predicted & gold)
    p = hit / len(predicted) if predicted else 0.0
    r = hit / len(gold)
    return p, r, (2 * p * r / (p + r) if hit else 0.0)


def summarize(
    ranked: Sequence[Sequence[int]], verdicts: Sequence[Iterable[int]], gold: Sequence[Iterable[int]], k: int
) -> dict[str, float]:
    """Macro averages over queries: recall@k of ``ranked`` and precision/recall/F1 of ``verdicts``."""
    if not (len(ranked) == len(verdicts) == len(gold)) or not gold:
        raise ValueError(
            f"summarize: {len(ranked)} rankings, {len(verdicts)} verdict sets, {len(gold)} gold sets: "
            "give one of each per query, at least one query"
        )
    gold = [list(g) for g in gold]
    prf = np.array([precision_recall_f1(v, g) for v, g in zip(verdicts, gold, strict=True)])
    return {
        f"recall_at_{k}": float(np.mean([recall_at_k(r, g, k) for r, g in zip(ranked, gold, strict=True)])),
        "precision": float(prf[:, 0].mean()),
        "recall": float(prf[:, 1].mean()),
        "f1": float(prf[:, 2].mean()),
    }

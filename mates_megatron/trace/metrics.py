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
    return {
        f"recall_at_{k}": float(np.mean([recall_at_k(r, g, k) for r, g in zip(ranked, gold, strict=True)])),
        **macro_prf(verdicts, gold),
    }


def macro_prf(verdicts: Sequence[Iterable[int]], gold: Sequence[Iterable[int]]) -> dict[str, float]:
    """Precision, recall and F1 of ``verdicts`` against ``gold``, each averaged over queries."""
    prf = np.array([precision_recall_f1(v, g) for v, g in zip(verdicts, gold, strict=True)])
    return {
        "precision": float(prf[:, 0].mean()),
        "recall": float(prf[:, 1].mean()),
        "f1": float(prf[:, 2].mean()),
    }


def macro_f1(verdicts: Sequence[Iterable[int]], gold: Sequence[Iterable[int]]) -> float:
    """Mean F1 over queries of ``verdicts`` against ``gold``."""
    return macro_prf(verdicts, gold)["f1"]


def apply_rule(rule: tuple[str, float], ranked: Sequence[Sequence[int]], scores: Sequence[Sequence[float]]):
    """The verdict set per query of a decision rule over a ranking: ``("top", k)`` keeps the first k,
    ``("above", t)`` keeps the documents scored at least t."""
    kind, value = rule
    if kind == "top":
        return [list(r)[: int(value)] for r in ranked]
    if kind == "above":
        return [
            [d for d, s in zip(r, sc, strict=True) if s >= value]
            for r, sc in zip(ranked, scores, strict=True)
        ]
    raise ValueError(f"decision rule {rule!r}: use ('top', k) or ('above', threshold)")


def tune_rule(
    ranked: Sequence[Sequence[int]],
    scores: Sequence[Sequence[float]],
    gold: Sequence[Iterable[int]],
    max_k: int,
    thresholds: bool = True,
) -> tuple[tuple[str, float], float]:
    """(rule, F1) of the decision rule with the best macro F1 on these (tuning) queries: top-k for k in
    1..max_k, and (with ``thresholds``) a score threshold at every score seen. The same rule families for
    every method, so no method is judged at a cut-off another was tuned for; ties go to the first rule
    tried (the smaller k, then the higher threshold)."""
    if max_k < 1:
        raise ValueError(f"tune_rule: max_k={max_k} must be >= 1")
    gold = [list(g) for g in gold]
    rules: list[tuple[str, float]] = [("top", k) for k in range(1, max_k + 1)]
    if thresholds:
        seen = sorted({float(s) for sc in scores for s in sc if np.isfinite(s)}, reverse=True)
        rules += [("above", t) for t in seen]
    best, best_f1 = rules[0], -1.0
    for rule in rules:
        f1 = macro_f1(apply_rule(rule, ranked, scores), gold)
        if f1 > best_f1:
            best, best_f1 = rule, f1
    return best, best_f1


def routing_recall(routed: Sequence[Iterable[int]], gold: Sequence[Iterable[int]]) -> float:
    """Mean over queries of the share of a query's gold documents among those it was routed to."""
    return float(
        np.mean(
            [
                len({int(g) for g in gs} & {int(r) for r in rs}) / len(set(gs))
                for rs, gs in zip(routed, gold, strict=True)
            ]
        )
    )


def oracle_verifier(routed: Sequence[Iterable[int]], gold: Sequence[Iterable[int]]) -> dict[str, float]:
    """Macro precision/recall/F1 of a perfect verifier after the routing: it keeps exactly the gold documents
    among the routed ones, so its F1 bounds what any verifier of these candidates can reach."""
    gold = [{int(g) for g in gs} for gs in gold]
    return macro_prf([{int(r) for r in rs} & gs for rs, gs in zip(routed, gold, strict=True)], gold)

"""The trace bench's scoring: every method judged by the same decision rule, tuned on held-out facts.

Each method's ranking (the top ``max_k`` pool documents per fact, with scores) is cut by a rule tuned to
the best macro F1 on one half of the facts (top-k for k in 1..max_k, or a score threshold at any score
seen: ``metrics.tune_rule``) and scored on the other half, then the halves swap (2-fold): every fact is
reported once, by a rule that never saw it. FASTTRACK also gets its own verifier's verdicts (z > 2, no
tuning), its routing recall (the share of supporting documents in the leaves it routed to, and among the
candidates it verified: the routed documents naming a keyword of the query), and the oracle verifier
(its candidates cut to exactly the supporting ones: the F1 no better verifier of those candidates can beat).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mates_lab.bench.intervals import mean_ci
from mates_megatron.trace.metrics import (
    apply_rule,
    oracle_verifier,
    precision_recall_f1,
    recall_at_k,
    routing_recall,
    summarize,
    tune_rule,
)


def halves(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Two disjoint halves of ``range(n)`` (a seeded shuffle, cut in the middle)."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    return sorted(order[: n // 2]), sorted(order[n // 2 :])


def held_out_rule(ranked, scores, gold, max_k: int, seed: int) -> dict[str, Any]:
    """Macro precision/recall/F1 over all queries, each query's verdicts cut by the rule tuned on the other
    half (2-fold), with the two rules and their tuning F1."""
    a, b = halves(len(gold), seed)
    prf: dict[int, tuple[float, float, float]] = {}
    rules = []
    for tune, report in ((a, b), (b, a)):
        rule, f1 = tune_rule(
            [ranked[i] for i in tune], [scores[i] for i in tune], [gold[i] for i in tune], max_k
        )
        verdicts = apply_rule(rule, [ranked[i] for i in report], [scores[i] for i in report])
        for i, v in zip(report, verdicts, strict=True):
            prf[i] = precision_recall_f1(v, gold[i])
        rules.append({"rule": list(rule), "tuning_f1": f1})
    m = np.array([prf[i] for i in range(len(gold))])
    return {
        "precision": float(m[:, 0].mean()),
        "recall": float(m[:, 1].mean()),
        "f1": float(m[:, 2].mean()),
        "rules": rules,
    }


def share_in_top(ranked, docs, k: int = 10) -> float:
    """Mean share of the first ``k`` places held by ``docs`` (per query)."""
    return float(np.mean([len(set(r[:k]) & set(d)) / k for r, d in zip(ranked, docs, strict=True)]))


def score_method(method: str, run: dict, gold: dict, facts: int, leaks: int, max_k: int, seed: int) -> dict:
    """The figures of one method's trace of the facts and leaks (``run``: ``bench.trace.trace``'s result)."""
    fids = [f"fact-{i}" for i in range(facts)]
    ranked = [run["ranked"][q] for q in fids]
    scores = [run["scores"][q] for q in fids]
    g = gold["facts"]
    out: dict[str, Any] = {
        "recall_at_10": summarize(ranked, [r[:10] for r in ranked], g, 10)["recall_at_10"],
        "tuned": held_out_rule(ranked, scores, g, max_k, seed),
        "top10_f1": summarize(ranked, [r[:10] for r in ranked], g, 10)["f1"],
        "distractor_share_of_top_10": share_in_top(ranked, gold["distractors"]),
        "same_relation_share_of_top_10": share_in_top(ranked, gold["same_relation"]),
        "seconds_per_query": run["meta"]["seconds_per_query"],
    }
    if method == "fasttrack":
        rec = run["meta"]["record"]
        where = {q: i for i, q in enumerate(run["order"])}
        routed = [rec["routed_ids"][where[q]] for q in fids]
        cand = [rec["candidate_ids"][where[q]] for q in fids]
        s = summarize(ranked, [run["verdicts"][q] for q in fids], g, 10)
        out["verdicts"] = {k: s[k] for k in ("precision", "recall", "f1")}
        out["routing_recall"] = routing_recall(routed, g)
        out["candidate_recall"] = routing_recall(cand, g)
        out["oracle_verifier"] = oracle_verifier(cand, g)
        # No verifier at all (every candidate kept): what the verifier has to improve on.
        out["all_candidates"] = {
            k: v for k, v in summarize(ranked, cand, g, 10).items() if k != "recall_at_10"
        }
        out["routed_documents"] = float(np.mean([len(r) for r in routed]))
        out["candidates"] = float(np.mean([len(c) for c in cand]))
        out["index_seconds"] = rec.get("index_seconds")
    if leaks:
        lranked = [run["ranked"][f"leak-{j}"] for j in range(leaks)]
        out["leakage_recall_at_10"] = float(
            np.mean([recall_at_k(r, x, 10) for r, x in zip(lranked, gold["leaks"], strict=True)])
        )
    return out


# The figures summarised over seeds (a path into one method's per-seed dict).
SUMMARY = {
    "f1": ("tuned", "f1"), "precision": ("tuned", "precision"), "recall": ("tuned", "recall"),
    "recall_at_10": ("recall_at_10",), "top10_f1": ("top10_f1",), "seconds_per_query": ("seconds_per_query",),
    "same_relation_share_of_top_10": ("same_relation_share_of_top_10",),
    "distractor_share_of_top_10": ("distractor_share_of_top_10",), "leakage_recall_at_10": ("leakage_recall_at_10",),
    "verdicts_f1": ("verdicts", "f1"), "routing_recall": ("routing_recall",), "candidate_recall": ("candidate_recall",),
    "oracle_verifier_f1": ("oracle_verifier", "f1"), "all_candidates_f1": ("all_candidates", "f1"), "oracle_verifier_recall": ("oracle_verifier", "recall"),
}  # fmt: skip


def summarize_seeds(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    """Per method and figure: per-seed values, their mean and 95% t-interval (``intervals.mean_ci``)."""
    out: dict[str, dict] = {}
    for method in per_seed[0]:
        out[method] = {}
        for name, path in SUMMARY.items():
            vals = []
            for seed in per_seed:
                v: Any = seed[method]
                for key in path:
                    v = v.get(key) if isinstance(v, dict) else None
                vals.append(v)
            if all(isinstance(v, int | float) for v in vals):
                out[method][name] = mean_ci(vals)
    return out

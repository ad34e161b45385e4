"""The projected cost of a round's filters (``SelectionConfig.filters``): each stage's pass over the candidates
that reach it, on the busiest rank, before the scorer's phases.

The n-gram scorers ('classifier', 'dsir') share a round out over the world's ranks (each reads, decodes and
featurizes its contiguous block, then the scores are all-gathered), so a stage of n candidates costs
``ceil(n / world) x seq_length / ngram_tokens_per_s`` on a rank (DSIR with ``raw_samples`` featurizes its
sample once more). A 'values' filter reads precomputed scores (`mates-megatron value`): nothing to project.
Another scorer used as a filter is not projected, and the projection says so.
"""

from __future__ import annotations

import math

from mates_megatron.cost.machine import Machine

NGRAM = ("classifier", "dsir")
FREE = ("values",)


def filter_parts(
    sel, machine: Machine, *, candidates: int, seq_length: int, world: int
) -> tuple[dict[str, float], list[str]]:
    """Seconds by filter stage (``<i>_<kind>``) on the busiest of ``world`` ranks, for a round of ``candidates``,
    and the kinds not projected."""
    parts: dict[str, float] = {}
    unprojected: list[str] = []
    n = candidates
    for i, (name, keep, config) in enumerate(sel.filter_stages):
        if name in NGRAM:
            raw = getattr(config, "raw_samples", None)
            read = math.ceil(n / world) + (math.ceil(raw / world) if raw is not None and raw < n else 0)
            parts[f"{i}_{name}"] = read * seq_length / machine.ngram_tokens_per_s
        elif name in FREE:
            parts[f"{i}_{name}"] = 0.0
        else:
            unprojected.append(name)
        n = math.ceil(keep * n)
    return parts, unprojected

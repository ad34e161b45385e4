"""The projected cost of the n-gram scorers' pass over a round: as the round's filters (``SelectionConfig.filters``,
before the scorer's phases) and as the round's scorer ('classifier' or 'dsir' with ``selector: topk``,
``cost.ngram``).

The n-gram scorers share a round out over the world's ranks (each reads, decodes and featurizes its contiguous
block, then the scores are all-gathered), so a pass over n candidates costs ``ceil(n / world) x seq_length /
ngram_tokens_per_s`` on a rank (DSIR with ``raw_samples`` featurizes its sample once more). A 'values' filter
reads precomputed scores (`mates-megatron value`): nothing to project. Another scorer used as a filter is not
projected, and the projection says so.
"""

from __future__ import annotations

import math

from mates_megatron.cost.machine import Machine

NGRAM = ("classifier", "dsir")
FREE = ("values",)


def ngram_pass(config, machine: Machine, *, candidates: int, seq_length: int, world: int) -> float:
    """Seconds of one n-gram scorer's pass over ``candidates`` on the busiest of ``world`` ranks (``config``: its
    ClassifierConfig or DSIRConfig)."""
    raw = getattr(config, "raw_samples", None)
    read = math.ceil(candidates / world) + (
        math.ceil(raw / world) if raw is not None and raw < candidates else 0
    )
    return read * seq_length / machine.ngram_tokens_per_s


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
            parts[f"{i}_{name}"] = ngram_pass(
                config, machine, candidates=n, seq_length=seq_length, world=world
            )
        elif name in FREE:
            parts[f"{i}_{name}"] = 0.0
        else:
            unprojected.append(name)
        n = math.ceil(keep * n)
    return parts, unprojected

"""The projected cost of the n-gram scorers' pass over a round: as the round's filters (``SelectionConfig.filters``,
before the scorer's phases) and as the round's scorer ('classifier' or 'dsir' with ``selector: topk``).

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


def project_ngram_round(
    name: str, config, sel, *, model, seq_length: int, global_batch_size: int, layout=None, machine=None, **_
):
    """The round of an n-gram scorer ``name`` ('classifier' or 'dsir', options ``config``) as the run's scorer:
    its pass over the candidates the filters leave it (phase ``score``), the filters' (phase ``filters``),
    beside the round's training on the same machine. FLOPs: training's only (the pass is host work, not
    counted in FLOPs)."""
    from mates_megatron.cost.machine import get_machine
    from mates_megatron.cost.round import RoundCost
    from mates_megatron.cost.seconds import RankSeconds
    from mates_megatron.cost.shapes import Layout

    layout = layout or Layout()
    mach = get_machine(machine if machine is not None else sel.cost_machine)
    work = RankSeconds(model, layout, mach, seq_length)
    n = sel.scored_candidates_per_round(global_batch_size)
    seconds = {
        "score": {name: ngram_pass(config, mach, candidates=n, seq_length=seq_length, world=layout.world)}
    }
    assumptions = [
        f"seconds on one rank of machine {mach.name} ({mach.source}); layout dp={layout.dp} tp={layout.tp} "
        f"pp={layout.pp}",
        f"the {name} scorer's pass over {n} candidates of {seq_length} tokens is shared over the world's "
        f"{layout.world} ranks, one host thread each, at {mach.ngram_tokens_per_s:.3g} tokens/s",
        "not counted: the scorer's one fit at the first scored round (the reference and a pool sample), the "
        "scores' all-gather",
    ]
    if sel.filters:
        round_candidates = sel.candidates_per_round(global_batch_size)
        seconds["filters"], unprojected = filter_parts(
            sel, mach, candidates=round_candidates, seq_length=seq_length, world=layout.world
        )
        if unprojected:
            assumptions.append(f"not counted: the scoring of filter(s) {', '.join(unprojected)}")
    fwd = model.forward_flops_per_token(seq_length) * seq_length
    return RoundCost(
        training=3.0 * fwd * sel.select_every * global_batch_size,
        phases={"score": 0.0},
        counts={"candidates": n},
        assumptions=assumptions,
        training_seconds=sel.select_every * work.training_step(global_batch_size),
        seconds=seconds,
        machine=mach.name,
    )

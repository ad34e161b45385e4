"""The projected round of an n-gram scorer ('classifier' or 'dsir') as the run's scorer: its pass over the
candidates the filters leave it (``cost.filters.ngram_pass``), beside the round's training."""

from __future__ import annotations

from mates_megatron.cost.filters import filter_parts, ngram_pass
from mates_megatron.cost.machine import get_machine
from mates_megatron.cost.round import RoundCost
from mates_megatron.cost.seconds import RankSeconds
from mates_megatron.cost.shapes import Layout


def project_ngram_round(
    name: str, config, sel, *, model, seq_length: int, global_batch_size: int, layout=None, machine=None, **_
):
    """The round of an n-gram scorer ``name`` ('classifier' or 'dsir', options ``config``) as the run's scorer:
    its pass over the candidates the filters leave it (phase ``score``), the filters' (phase ``filters``),
    beside the round's training on the same machine. FLOPs: training's only (the pass is host work, not
    counted in FLOPs)."""
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

"""The projected cost of a selection round against the training of a round, before it is spent: in seconds (what
the guard reads) and in FLOPs.

Seconds (``RoundCost.seconds``, ``fraction``): every phase on one rank from counts and a ``Machine``'s rates
(``cost.seconds``, ``cost.phases``): the passes with their batch-1 rate, logits and elementwise work, framework
overhead and pipeline serialisation; per probe the memory-bound optimizer step, restore and dot; x dp for
estimators that step a distributed optimizer; the influence stage's host-side decode and tokenisation, its
encoder passes and its collectives through gloo; reference rows at their packed length when their token count is
given. Training is projected with the same constants, so the fraction is one machine's seconds over its seconds.

FLOPs (``RoundCost.training``, ``phases``, ``flop_fraction``), a multiply-add is 2:

- a transformer's forward pass costs, per token, 2 x its non-embedding weights (attention projections and
  MLP), plus 2 x vocab x hidden for the logits (GPT only), plus 4 x layers x context x hidden for the
  attention scores and values; a backward pass costs twice the forward;
- every probe sample and every reference row is a full ``seq_length`` row (reference rows are padded to it);
- a candidate is ``seq_length`` tokens of the encoder's tokenizer too, cut at max_length x max_chunks.

tests/unit/test_cost.py checks the FLOP counts against torch's FLOP counter on the real GPT and encoder, and the
seconds' terms by hand; ``mates-lab bench round`` sets each phase measured on this machine beside its
projection.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from mates_megatron.cost.filters import filter_parts
from mates_megatron.cost.machine import Machine, get_machine
from mates_megatron.cost.phases import influence_parts, probe_parts, probe_share
from mates_megatron.cost.seconds import RankSeconds
from mates_megatron.cost.shapes import Layout, TransformerShape


@dataclass
class RoundCost:
    """One round's phases beside the training of the round's steps: seconds on one rank, and FLOPs."""

    training: float
    """FLOPs of the round's training steps (all ranks)."""
    phases: dict[str, float]
    """FLOPs of probe (oracle/linearized/mirrored/forward passes on the live model), fit (influence model
    training or probe embedding), predict (encoder passes over every candidate)."""
    counts: dict[str, int]
    """probes, reference rows, candidates, encoder tokens per candidate, probes per rank."""
    assumptions: list[str] = field(default_factory=list)
    training_seconds: float = math.nan
    """The round's training steps on one rank, projected with the same machine."""
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per phase (probe, fit, predict; filters when the run has them), its parts' seconds on one rank."""
    machine: str = ""

    @property
    def phase_seconds(self) -> dict[str, float]:
        return {k: sum(v.values()) for k, v in self.seconds.items()}

    @property
    def selection_seconds(self) -> float:
        return sum(self.phase_seconds.values())

    @property
    def fraction(self) -> float:
        """Selection seconds over training seconds: what ``max_selection_cost`` bounds."""
        return self.selection_seconds / self.training_seconds

    @property
    def selection(self) -> float:
        return sum(self.phases.values())

    @property
    def flop_fraction(self) -> float:
        return self.selection / self.training

    def dominant(self) -> tuple[str, str]:
        """The largest phase and its largest part."""
        ph = self.phase_seconds
        top = max(ph, key=ph.get)
        parts = self.seconds[top]
        return top, max(parts, key=parts.get)

    def summary(self) -> str:
        t = self.training_seconds
        parts = ", ".join(f"{k} {v / t:.2%}" for k, v in self.phase_seconds.items())
        c = self.counts
        head = (
            f"projected selection cost per round: {self.fraction:.2%} of the round's training time on "
            f"{self.machine} ({self.selection_seconds:.4g} s against {t:.4g} s per rank; {parts}; "
            f"{self.flop_fraction:.2%} in FLOPs) for "
        )
        if "probes" not in c:  # a scorer without probes (the n-gram scorers)
            return head + f"{c['candidates']} candidates"
        return head + (
            f"{c['probes']} probes ({c['probes_per_rank']} per rank) against {c['reference_rows']} reference rows "
            f"and {c['candidates']} candidates of {c['encoder_tokens']} encoder tokens"
        )

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "phase_seconds": self.phase_seconds,
            "selection_seconds": self.selection_seconds,
            "fraction": self.fraction,
            "selection": self.selection,
            "flop_fraction": self.flop_fraction,
        }


def _steps_optimizer(estimator: str) -> bool:
    from mates_megatron.probe.estimators import ESTIMATORS

    return ESTIMATORS.get(estimator).steps_optimizer


def project_mates_round(
    sel,
    mates=None,
    *,
    model: TransformerShape,
    seq_length: int,
    global_batch_size: int,
    reference_rows: int,
    encoder: TransformerShape | None = None,
    layout: Layout | None = None,
    machine: Machine | str | None = None,
    reference_tokens: int | None = None,
) -> RoundCost:
    """The 'mates' scorer's round for ``sel`` (a SelectionConfig: round sizes, influence ranks, cost machine)
    and ``mates`` (its ``MatesConfig``; None: ``sel.scorer_config``) on a GPT of shape ``model``.

    ``encoder``: the influence encoder's shape (default: read from ``mates.influence``'s local model).
    ``layout``: the GPT's parallel layout and precision (default: one device, micro-batch 8, fp32).
    ``machine``: a preset name or a Machine (default: ``sel.cost_machine``).
    ``reference_tokens``: the reference set's real token count; given, its rows are packed (``reference_tokens /
    seq_length`` full rows), else every row is padded to ``seq_length``.
    """
    mates = sel.scorer_config if mates is None else mates
    inf = mates.influence
    if encoder is None:
        encoder = TransformerShape.from_encoder_dir(inf.resolved_path())
    layout = layout or Layout()
    mach = get_machine(machine if machine is not None else sel.cost_machine)
    packed = reference_tokens is not None
    ref = math.ceil(reference_tokens / seq_length) if packed else reference_rows
    fwd = model.forward_flops_per_token(seq_length) * seq_length  # one full row, forward
    training = 3.0 * fwd * sel.select_every * global_batch_size
    probes = mates.probe_samples
    probe = {
        # one step on the sample, then the whole reference set, per probe (+ the loss before, once)
        "oracle": probes * (3.0 * fwd + ref * fwd) + ref * fwd,
        "rollout": probes * (3.0 * fwd + ref * fwd) + ref * fwd,  # the same, restored once per rollout
        # one reference gradient per round, one gradient per probe
        "linearized": 3.0 * ref * fwd + probes * 3.0 * fwd,
        "linearized_rollout": 3.0 * ref * fwd + probes * 3.0 * fwd,  # the same, restored once per rollout
        # one reference step, then each probe's loss before and after (forward only)
        "mirrored": 3.0 * ref * fwd + probes * 2.0 * fwd,
        # one reference gradient, then each probe's loss at θ + s·d and θ - s·d (forward only)
        "forward": 3.0 * ref * fwd + probes * 2.0 * fwd,
    }.get(mates.estimator)
    if probe is None:
        raise ValueError(f"no cost model for estimator {mates.estimator!r}: add one to mates_megatron.cost")
    candidates = sel.scored_candidates_per_round(global_batch_size)  # what the filters leave it
    tokens = min(seq_length, inf.max_length * inf.max_chunks)
    chunk = min(tokens, inf.max_length)
    enc = encoder.forward_flops_per_token(chunk, logits=False) * tokens  # one candidate, forward
    static = inf.model in ("ridge", "relational") and inf.ridge.features == "token_embeddings"
    if static:  # a mean of looked-up rows: hidden adds per token
        enc = float(encoder.hidden_size * tokens)
    pairs = probes * mates.influence_rounds  # past rounds' probes are fitted on again, and predicted again
    if inf.model == "finetune":
        val = max(3, round(pairs * inf.finetune.val_fraction))
        fit = inf.finetune.epochs * ((pairs - val) * 3.0 * enc + val * enc)
    else:
        fit = pairs * enc

    work = RankSeconds(model, layout, mach, seq_length)
    steps_opt = _steps_optimizer(mates.estimator)
    probe_s = probe_parts(mates.estimator, work, probes=probes, reference_rows=ref, steps_optimizer=steps_opt)
    ranks = len(sel.influence_ranks) if sel.influence_ranks else layout.world
    fit_s, predict_s = influence_parts(
        inf, encoder, mach, tokens=tokens, candidates=candidates, pairs=pairs, probes=probes, ranks=ranks
    )
    share = probe_share(probes, work, steps_optimizer=steps_opt)
    lay = layout
    assumptions = [
        "forward FLOPs/token = 2 x non-embedding weights + 2 x vocab x hidden (GPT logits) + "
        "4 x layers x context x hidden; backward = 2 x forward",
        f"reference rows: {ref} " + (f"packed rows ({reference_tokens} tokens)" if packed else "padded rows")
        + f" of {seq_length} tokens; probe samples are full rows",
        f"a candidate is {tokens} encoder tokens ({seq_length} pretraining tokens cut at max_length x "
        "max_chunks, one encoder token per pretraining token)",
        f"seconds on one rank of machine {mach.name} ({mach.source}); layout dp={lay.dp} tp={lay.tp} pp={lay.pp} "
        f"micro-batch {lay.micro_batch_size}, {'distributed optimizer' if lay.distributed_optimizer else 'DDP'}"
        f", {'bf16 + fp32 mains' if lay.bf16 else 'fp32'}",
        f"{share} probes per rank ("
        + ("every replica probes every sample: the estimator steps a distributed optimizer"
           if share == probes and lay.dp > 1 else "the data-parallel replicas split them")
        + "); a probe's forward-backward at batch 1 passes the pp stages one after another",
        f"the influence stage on {ranks} ranks, each decoding and tokenising its share on one host thread"
        + (" (pass_token_ids: no decode or tokenise)" if inf.pass_token_ids else ""),
        "not counted: the data-parallel gradient reduce of training steps (overlapped with the backward), "
        "selection and publishing (milliseconds per million candidates), the reads of the pool",
    ]  # fmt: skip
    if static:
        assumptions.append("token-embedding features: one add per hidden unit per token, no encoder pass")
    seconds = {"probe": probe_s, "fit": fit_s, "predict": predict_s}
    if sel.filters:
        round_candidates = sel.candidates_per_round(global_batch_size)
        seconds["filters"], unprojected = filter_parts(
            sel, mach, candidates=round_candidates, seq_length=seq_length, world=layout.world
        )
        assumptions.append(
            f"filters ({' > '.join(name for name, _, _ in sel.filter_stages)}) leave the scorer {candidates} of "
            f"the round's {round_candidates} candidates; the n-gram filters' pass is shared over the world's "
            f"{layout.world} ranks, one thread each"
            + (f"; not counted: the scoring of filter(s) {', '.join(unprojected)}" if unprojected else "")
        )
    return RoundCost(
        training=training,
        phases={"probe": probe, "fit": fit, "predict": (candidates + pairs - probes) * enc},
        counts={
            "probes": probes,
            "reference_rows": ref,
            "candidates": candidates,
            "encoder_tokens": tokens,
            "probes_per_rank": share,
        },
        assumptions=assumptions,
        training_seconds=sel.select_every * work.training_step(global_batch_size),
        seconds=seconds,
        machine=mach.name,
    )


# What lowers each phase, for the refusal's message.
_LEVERS = {
    "probe": "estimator: forward (batched forward passes, replicas split the probes under the distributed "
    "optimizer too), fewer probe_samples or reference rows, or estimator: linearized (the oracle runs the whole "
    "reference set once per probe; for group_mates: linearized_rollout)",
    "fit": "fewer probe_samples, influence_rounds or influence finetune epochs",
    "group": "shard_size of selector 'cluster_greedy' (e.g. 30000: its k-means grows as candidates x shard_size "
    "/ cluster_size, spread over the ranks; without it as candidates^2 / cluster_size on one rank), fewer "
    "kmeans_iters, influence.pass_token_ids (no decode or tokenise of the shards), or fewer candidates a round",
    "filters": "a static filter's scores computed once for the pool (`mates-megatron value --method classifier` or "
    "dsir, with the run's selection seed) and read by a 'values' filter ({kind: values, path: ..., keep: ...}), or "
    "fewer candidates a round",
    "score": "the scorer's values computed once for the pool (`mates-megatron value --method classifier` or dsir, "
    "with the run's selection seed) and read by scorer 'values' ({kind: values, path: ...}), filters that leave "
    "it fewer candidates, or fewer candidates a round",
    "predict": "influence.pass_token_ids (no decode or tokenise, where the pool uses the encoder's vocabulary), a "
    "smaller influence encoder, a lower influence max_length x max_chunks, or ridge features: token_embeddings",
}


def check_round_cost(cost: RoundCost, limit: float) -> None:
    """Refuse a plan whose projected selection time is above ``limit`` (SelectionConfig.max_selection_cost) of
    the round's training time."""
    if cost.fraction > limit:
        top, part = cost.dominant()
        share = cost.seconds[top][part] / cost.phase_seconds[top]
        raise ValueError(
            f"{cost.summary()}: above SelectionConfig.max_selection_cost={limit} (--mates-max-selection-cost). "
            f"The largest phase is {top} ({part} {share:.0%} of it): {_LEVERS.get(top, 'lower it')}; or raise "
            "max_selection_cost if you mean to spend it"
        )

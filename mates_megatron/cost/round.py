"""The projected cost of a selection round against the training compute of a round, before it is spent.

Counted in FLOPs (a multiply-add is 2) from the config and the model shapes, with the assumptions stated in
``RoundCost.assumptions``:

- a transformer's forward pass costs, per token, 2 x its non-embedding weights (attention projections and
  MLP), plus 2 x vocab x hidden for the logits (GPT only), plus 4 x layers x context x hidden for the
  attention scores and values; a backward pass costs twice the forward;
- every probe sample and every reference row is a full ``seq_length`` row (reference rows are padded to it);
- a candidate is ``seq_length`` tokens of the encoder's tokenizer too, cut at max_length x max_chunks;
- optimizer steps, the ridge solve, token-embedding lookups and communication are left out (small next to the
  passes at paper scale; each round's log gives the measured seconds per phase beside the projection).

tests/unit/test_cost.py checks the counts against torch's FLOP counter on the real GPT and encoder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TransformerShape:
    """What the FLOP count needs of a transformer: the GPT being trained or the influence encoder."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    vocab_size: int
    """For the GPT's logits; unused for an encoder (no output layer in its forward)."""

    @classmethod
    def from_encoder_dir(cls, path: str | Path) -> TransformerShape:
        """A BERT-style encoder's shape from its ``config.json`` (read only, no weights)."""
        c = json.loads((Path(path) / "config.json").read_text())
        return cls(c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], c["vocab_size"])

    def forward_flops_per_token(self, context: int, *, logits: bool = True) -> float:
        h, L = self.hidden_size, self.num_layers
        weights = L * (4 * h * h + 2 * h * self.ffn_hidden_size)
        return 2.0 * weights + (2.0 * self.vocab_size * h if logits else 0.0) + 4.0 * L * context * h


@dataclass
class RoundCost:
    """FLOPs of one round's phases beside the training FLOPs of the round's steps."""

    training: float
    phases: dict[str, float]
    """probe (oracle/linearized/mirrored passes on the live model), fit (influence model training or probe
    embedding), predict (encoder passes over every candidate)."""
    counts: dict[str, int]
    """probes, reference rows, candidates, encoder tokens per candidate."""
    assumptions: list[str] = field(default_factory=list)

    @property
    def selection(self) -> float:
        return sum(self.phases.values())

    @property
    def fraction(self) -> float:
        return self.selection / self.training

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v / self.training:.2%}" for k, v in self.phases.items())
        c = self.counts
        return (
            f"projected selection cost per round: {self.fraction:.2%} of the round's training FLOPs "
            f"({self.selection:.3g} against {self.training:.3g}; {parts}) for {c['probes']} probes against "
            f"{c['reference_rows']} reference rows and {c['candidates']} candidates of "
            f"{c['encoder_tokens']} encoder tokens"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "selection": self.selection, "fraction": self.fraction}


def project_mates_round(
    sel,
    *,
    model: TransformerShape,
    seq_length: int,
    global_batch_size: int,
    reference_rows: int,
    encoder: TransformerShape | None = None,
) -> RoundCost:
    """The 'mates' scorer's round for ``sel`` (a SelectionConfig) on a GPT of shape ``model``.

    ``encoder``: the influence encoder's shape (default: read from ``sel.influence``'s local model).
    """
    inf = sel.influence
    if encoder is None:
        encoder = TransformerShape.from_encoder_dir(inf.resolved_path())
    fwd = model.forward_flops_per_token(seq_length) * seq_length  # one full row, forward
    training = 3.0 * fwd * sel.select_every * global_batch_size
    probes, ref = sel.probe_samples, reference_rows
    probe = {
        # one step on the sample, then the whole reference set, per probe (+ the loss before, once)
        "oracle": probes * (3.0 * fwd + ref * fwd) + ref * fwd,
        # one reference gradient per round, one gradient per probe
        "linearized": 3.0 * ref * fwd + probes * 3.0 * fwd,
        # one reference step, then each probe's loss before and after (forward only)
        "mirrored": 3.0 * ref * fwd + probes * 2.0 * fwd,
    }.get(sel.estimator)
    if probe is None:
        raise ValueError(f"no cost model for estimator {sel.estimator!r}: add one to mates_megatron.cost")
    candidates = sel.candidates_per_round(global_batch_size)
    tokens = min(seq_length, inf.max_length * inf.max_chunks)
    chunk = min(tokens, inf.max_length)
    enc = encoder.forward_flops_per_token(chunk, logits=False) * tokens  # one candidate, forward
    static = inf.model == "ridge" and inf.ridge.features == "token_embeddings"
    if static:  # a mean of looked-up rows: hidden adds per token
        enc = float(encoder.hidden_size * tokens)
    pairs = probes * sel.influence_rounds  # past rounds' probes are fitted on again, and predicted again
    if inf.model == "finetune":
        val = max(3, round(pairs * inf.finetune.val_fraction))
        fit = inf.finetune.epochs * ((pairs - val) * 3.0 * enc + val * enc)
    else:
        fit = pairs * enc
    assumptions = [
        "forward FLOPs/token = 2 x non-embedding weights + 2 x vocab x hidden (GPT logits) + "
        "4 x layers x context x hidden; backward = 2 x forward",
        f"probe samples and reference rows are full rows of {seq_length} tokens",
        f"a candidate is {tokens} encoder tokens ({seq_length} pretraining tokens cut at max_length x "
        "max_chunks, one encoder token per pretraining token)",
        "optimizer steps, the ridge solve and communication are not counted",
    ]
    if static:
        assumptions.append("token-embedding features: one add per hidden unit per token, no encoder pass")
    return RoundCost(
        training=training,
        phases={"probe": probe, "fit": fit, "predict": (candidates + pairs - probes) * enc},
        counts={
            "probes": probes,
            "reference_rows": ref,
            "candidates": candidates,
            "encoder_tokens": tokens,
        },
        assumptions=assumptions,
    )


# What lowers each phase, for the refusal's message.
_LEVERS = {
    "probe": "fewer probe_samples or reference rows, or estimator: linearized (the oracle runs the whole "
    "reference set once per probe)",
    "fit": "fewer probe_samples, influence_rounds or influence finetune epochs",
    "predict": "a smaller influence encoder, a lower influence max_length x max_chunks, or ridge features: "
    "token_embeddings",
}


def check_round_cost(cost: RoundCost, limit: float) -> None:
    """Refuse a plan whose projected selection cost is above ``limit`` (SelectionConfig.max_selection_cost)."""
    if cost.fraction > limit:
        top = max(cost.phases, key=cost.phases.get)
        raise ValueError(
            f"{cost.summary()}: above SelectionConfig.max_selection_cost={limit} (--mates-max-selection-cost). "
            f"The largest phase is {top}: {_LEVERS.get(top, 'lower it')}; or raise max_selection_cost if you "
            "mean to spend it"
        )

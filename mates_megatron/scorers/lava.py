"""LAVA (Just et al., ICLR 2023) as a scorer ('lava'): each candidate's calibrated OT gradient toward the
probe reference, from the streamed Sinkhorn component (``mates_megatron.ot``). Higher = more harmful, so the
score is the value itself and ``selector: topk`` keeps the least harmful.

Feature-only for unlabelled text (the cost is half the squared distance of the influence encoder's
normalised embeddings); with ``labelled: true`` the cost adds ``label_weight`` times the label distance
between the candidate's domain (the pool's domain ids) and the reference example's ``"domain"`` key
(``ot.valuation.lava_values``): LAVA's class-wise mode, for classification data whose classes are domains.
Model-free, so it needs no warm-up; it reads the reference and the candidates' text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mates_megatron.encoder import EncoderConfig
from mates_megatron.ot import SinkhornConfig
from mates_megatron.ot.valuation import lava_values
from mates_megatron.scorers.base import SCORERS, RoundInput, Scores
from mates_megatron.scorers.embedding import EmbeddingScorer


@dataclass(frozen=True)
class OTScorerConfig(EncoderConfig):
    """Options shared by the OT scorers: the encoder they embed with (``EncoderConfig``'s fields:
    model_path, max_length, max_chunks, device, bf16, features, batch_size) and the transport."""

    epsilon: float = 0.05
    """Entropic regularisation of the transport (absolute; squared distances of unit vectors lie in [0, 4])."""
    block_size: int = 16384
    """Candidates per Sinkhorn block (memory O(block_size x reference))."""
    max_iter: int = 1000
    """Sinkhorn passes at most."""
    tol: float = 1e-3
    """Sinkhorn stopping tolerance (L1 error of the reference marginal)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        SinkhornConfig(epsilon=self.epsilon, block_size=self.block_size, max_iter=self.max_iter, tol=self.tol)

    def sinkhorn(self, seed: int, **kw: Any) -> SinkhornConfig:
        return SinkhornConfig(
            epsilon=self.epsilon, block_size=self.block_size, max_iter=self.max_iter, tol=self.tol,
            seed=seed, **kw,
        )  # fmt: skip


@dataclass(frozen=True)
class LavaConfig(OTScorerConfig):
    """Options of the 'lava' scorer."""

    labelled: bool = False
    """Class-wise cost: candidates' pool domains against the reference's "domain" keys."""
    label_weight: float = 1.0
    """Weight of the label distance in the cost (labelled mode). 1 is the authors' (OTDD's
    ``DatasetDistance(λ_x=1, λ_y=1)`` in ruoxi-jia-group/LAVA). A larger weight hurts when label flips change
    the class counts: balanced OT then ships the surplus across labels at ``label_weight`` times the label
    distance and whole classes' potentials move, drowning the per-point signal (load_digits, 10% flips:
    flip recall@10% 0.36 at 3, 0.82 at 1, means over 5 seeds; docs/results/lava.md)."""
    label_epsilon: float = 0.5
    """Entropic regularisation of the label distances (a larger one debiases small class samples)."""
    max_per_class: int = 1000
    """Points per class the label distances are computed on (a seeded sample; the transport uses all)."""
    reweight_to_reference_classes: bool = False
    """Labelled mode: give each candidate class the reference's share of the mass (even within the class)
    instead of uniform masses, so that class counts changed by flips are not shipped across labels."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reweight_to_reference_classes and not self.labelled:
            raise ValueError(
                "LavaConfig.reweight_to_reference_classes needs labelled: true (there are no classes to "
                "reweight in feature-only mode); set labelled: true or leave it false"
            )
        if not self.label_weight >= 0 or not self.label_epsilon > 0 or self.max_per_class < 1:
            raise ValueError(
                f"LavaConfig needs label_weight >= 0, label_epsilon > 0, max_per_class >= 1; got "
                f"{self.label_weight}, {self.label_epsilon}, {self.max_per_class}"
            )


def reference_domains(reference: Any, names: list[str]) -> np.ndarray:
    """The reference examples' "domain" keys as indices into the pool's domain names."""
    from mates_megatron.probe.reference import read_jsonl

    out = []
    for lineno, obj in read_jsonl(reference.path):
        d = obj.get("domain")
        if d not in names:
            raise ValueError(
                f'{reference.path} line {lineno}: LAVA\'s labelled mode needs a "domain" key naming one of '
                f"the pool's domains {names}, got {d!r}; set scorer_options.labelled: false for feature-only"
            )
        out.append(names.index(d))
    return np.asarray(out, dtype=np.int64)


@SCORERS.register("lava")
class LavaScorer(EmbeddingScorer):
    """Score = the LAVA value (calibrated OT gradient toward the reference; lower = more useful)."""

    Config = LavaConfig

    def score(self, r: RoundInput) -> Scores:
        c, t = self.config, time.perf_counter()
        x, y, t_embed = self.embed(r, scorer="lava")
        labels = {}
        if c.labelled:
            labels = dict(
                x_labels=r.pool.domain_ids(np.asarray(r.candidates)).astype(np.int64),
                y_labels=reference_domains(self.reference(r), list(r.pool.domains)),
            )
        values, res, _ = lava_values(
            x, y, c.sinkhorn(r.seed, cost_scale=0.5), label_weight=c.label_weight,
            label_epsilon=c.label_epsilon, max_per_class=c.max_per_class,
            reweight_to_reference_classes=c.reweight_to_reference_classes, **labels,
        )  # fmt: skip
        return Scores(values, ot_record(res, t_embed, time.perf_counter() - t), features=x)


def ot_record(res, t_embed: float, total: float) -> dict[str, Any]:
    """The round record of an OT scorer."""
    return {
        "ot_value": res.value,
        "sinkhorn_iterations": res.iterations,
        "sinkhorn_marginal_error": res.marginal_error,
        "sinkhorn_converged": res.converged,
        "seconds": {"embed": t_embed, "sinkhorn": res.seconds, "score": total},
    }

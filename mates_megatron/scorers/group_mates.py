"""Group-MATES (Yu et al. 2025, arXiv 2502.14709) as a scorer inside the round: MATES's round with the group
oracle and the relational influence model, giving the candidates' embeddings to a set selector.

Per scored round: the probes are rollouts on the live model (estimator 'rollout': each probe scored by its
step's reference-loss change given the steps before it in its rollout); influence model 'relational' is
fitted on them (a head for each sample's own score, and the relationship's alpha and temperature); every
candidate gets its own predicted score, and its embedding from the same frozen encoder (``Scores.features``),
so that selector 'cluster_greedy' chooses the round as a set. Use ``selector: cluster_greedy``.

The embeddings are computed when the selector reads them, in the training process when the round is published:
with the selector's ``shard_size``, each rank embeds only the shards it clusters and picks; without it the
group's first rank embeds the whole round. Not built: keeping the embeddings from the influence stage's
prediction, which computes them already (the encoder runs twice over each candidate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from mates_megatron.encoder import Encoder, EncoderConfig
from mates_megatron.influence.config import InfluenceConfig
from mates_megatron.pool.base import candidate_inputs
from mates_megatron.probe.rollout import LinearizedRolloutProber, RolloutProber
from mates_megatron.scorers.base import SCORERS, PendingScores, RoundInput, ScorerContext, Scores
from mates_megatron.scorers.mates import MatesConfig, MatesScorer

ROLLOUT_ESTIMATORS = {"rollout": RolloutProber, "linearized_rollout": LinearizedRolloutProber}
"""The estimators whose probes are rollouts (what the relational model is fitted on)."""


def _relational() -> InfluenceConfig:
    return InfluenceConfig(model="relational")


@dataclass
class GroupMatesConfig(MatesConfig):
    """Options of the 'group_mates' scorer: MATES's, with the rollout oracle and the relational model."""

    estimator: str = "rollout"
    """'rollout' (the group oracle: a reference pass per probe) or 'linearized_rollout' (the same rollouts to
    first order: one reference gradient a round, a dot per probe; mates_megatron.probe.rollout)."""
    influence: InfluenceConfig = field(default_factory=_relational)
    """The influence model: 'relational' (its ``relational`` section: rollout length, fit), on the frozen
    encoder's ``ridge.features``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.estimator not in ROLLOUT_ESTIMATORS or self.influence.model != "relational":
            raise ValueError(
                f"GroupMatesConfig: estimator={self.estimator!r}, influence.model={self.influence.model!r}; "
                "Group-MATES needs estimator 'rollout' or 'linearized_rollout' and influence model "
                "'relational' (for MATES's own, use scorer 'mates')"
            )
        length = self.influence.relational.rollout_length
        if self.probe_samples % length:
            raise ValueError(
                f"GroupMatesConfig.probe_samples={self.probe_samples} must be a multiple of "
                f"influence.relational.rollout_length={length} (the probes are whole rollouts)"
            )


@SCORERS.register("group_mates")
class GroupMatesScorer(MatesScorer):
    """See the module."""

    Config: ClassVar[type] = GroupMatesConfig
    gives_features: ClassVar[bool] = True

    def __init__(self, config: GroupMatesConfig | None = None, *, context: ScorerContext, **kw: Any) -> None:
        super().__init__(config or GroupMatesConfig(), context=context, **kw)
        inf = self.config.influence
        self.encoder = Encoder(
            EncoderConfig.from_influence(inf, features=inf.ridge.features, batch_size=inf.predict_batch_size),
            device=context.device,
        )

    @classmethod
    def projected_cost(cls, config: GroupMatesConfig, selection, **shape: Any):
        from mates_megatron.cost.group import project_group_mates_round

        return project_group_mates_round(selection, config, **shape)

    def estimator(self, ctx) -> RolloutProber:
        est = ROLLOUT_ESTIMATORS[self.config.estimator]
        return est(ctx, rollout_length=self.config.influence.relational.rollout_length)

    def begin(self, r: RoundInput) -> PendingScores:
        pending = super().begin(r)

        def finish() -> Scores:
            out = pending.result()
            # Lazy: the selector embeds the candidates it picks among (with shards, a rank's own shards only),
            # uncached: a round's candidates are read once, and a cache of every round would grow with the pool.
            # The encoder reads what the influence model read (token ids under influence.pass_token_ids), with
            # its loader workers.
            inf = self.config.influence
            out.features = lambda pos: self.encoder.embed(
                candidate_inputs(r.pool, r.candidates[pos], token_ids=inf.pass_token_ids),
                loader_workers=inf.loader_workers,
            )
            return out

        return PendingScores(finish=finish)

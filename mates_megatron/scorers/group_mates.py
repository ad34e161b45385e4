"""Group-MATES (Yu et al. 2025, arXiv 2502.14709) as a scorer inside the round: MATES's round with the group
oracle and the relational influence model, giving each candidate's own score and embedding to a set selector.

Per scored round: the probes are rollouts on the live model (estimator 'rollout': each probe scored by its
step's reference-loss change given the steps before it in its rollout); influence model 'relational' is
fitted on them (a head for each sample's own score, and the relationship's alpha and temperature) on the
influence group, which predicts only the fit's own pairs. The fitted head reaches every rank, and the
candidates' own scores and embeddings are then computed together, in one pass of the frozen encoder, when the
selector reads them (``Scores.scores`` and ``Scores.features`` are callables from positions to rows,
``ShardRows``): with the selector's ``shard_size`` each rank embeds only the shards it clusters and picks;
without it the group's first rank embeds the whole round. Each candidate is embedded once a round, where
the prediction and then the selector used to embed it twice. Use ``selector: cluster_greedy``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch.distributed as dist

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


class ShardRows:
    """The candidates' own scores (the relational model's head, as its ``predict`` gives them) and their
    L2-normalised embeddings (as ``Encoder.embed`` gives them), at positions asked for: both from one encoder
    pass over those positions, kept until other positions are asked for (a selector reads a shard's
    embeddings, then its scores)."""

    def __init__(
        self, net, head: dict[str, Any], pool, candidates: np.ndarray, *, token_ids: bool, batch_size: int,
        loader_workers: int,
    ) -> None:  # fmt: skip
        self.net, self.pool, self.candidates, self.token_ids = net, pool, np.asarray(candidates), token_ids
        self.w = head["weight"].detach().double().cpu().numpy()[0]
        self.b = float(head["bias"].detach())
        self.batch_size, self.loader_workers = batch_size, loader_workers
        self._pos: np.ndarray | None = None
        self._rows: tuple[np.ndarray, np.ndarray] | None = None
        self.passes = 0
        """Encoder passes so far (one per distinct set of positions asked for)."""

    def _load(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from mates_megatron.influence.loader import spans
        from mates_megatron.influence.ridge import streamed_features
        from mates_megatron.ot.valuation import normalize_rows

        pos = np.asarray(pos)
        if self._pos is not None and np.array_equal(pos, self._pos):
            return self._rows
        self.net.eval()
        texts = candidate_inputs(self.pool, self.candidates[pos], token_ids=self.token_ids)
        own = np.empty(len(pos), dtype=np.float32)
        emb = np.empty((len(pos), self.net.encoder.config.hidden_size), dtype=np.float32)
        parts = spans(0, len(pos), self.batch_size)
        for part, x in zip(parts, streamed_features(self.net, texts, parts, workers=self.loader_workers),
                           strict=True):  # fmt: skip
            own[part.start : part.stop] = x @ self.w + self.b  # float32, as the influence model predicts
            emb[part.start : part.stop] = x  # float32, then normalised, as Encoder.embed
        self._pos, self._rows, self.passes = (
            pos.copy(),
            (own.astype(np.float64), normalize_rows(emb)),  # as Encoder.embed normalises
            self.passes + 1,
        )
        return self._rows

    def scores(self, pos: np.ndarray) -> np.ndarray:
        return self._load(pos)[0]

    def features(self, pos: np.ndarray) -> np.ndarray:
        return self._load(pos)[1]


@SCORERS.register("group_mates")
class GroupMatesScorer(MatesScorer):
    """See the module."""

    Config: ClassVar[type] = GroupMatesConfig
    gives_features: ClassVar[bool] = True
    gives_lazy_scores: ClassVar[bool] = True

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

    def influence_ids(self, ids: np.ndarray, fit_positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The influence stage fits and predicts only the fit's pairs: the candidates' own scores come with
        their embeddings, at selection (``ShardRows``)."""
        return ids[fit_positions], np.arange(len(fit_positions))

    def _head(self) -> dict[str, Any]:
        """The fitted head on every rank of the world (the influence group's first rank sends it)."""
        state = self.influence.state_dict()["model"] if self.influence.member else None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from mates_megatron.influence.group import influence_group

            box = [state]
            group = influence_group(timeout_s=self.config.influence.timeout_s)
            dist.broadcast_object_list(box, src=self.influence.ranks[0], group=group)
            state = box[0]
        return state

    def begin(self, r: RoundInput) -> PendingScores:
        pending = super().begin(r)

        def finish() -> Scores:
            out = pending.result()
            # Read the way the influence model reads candidates (token ids under influence.pass_token_ids), by
            # its loader workers; uncached across rounds: a round's candidates are read once.
            inf = self.config.influence
            rows = ShardRows(
                self.encoder.net(), self._head(), r.pool, r.candidates, token_ids=inf.pass_token_ids,
                batch_size=self.encoder.config.batch_size, loader_workers=inf.loader_workers,
            )  # fmt: skip
            out.scores, out.features = rows.scores, rows.features
            return out

        return PendingScores(finish=finish)

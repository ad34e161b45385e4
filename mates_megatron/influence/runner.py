"""One influence model across rounds: fit and predict on the influence group, share scores, checkpoint state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mates_megatron.influence.base import InfluenceModel
from mates_megatron.influence.config import InfluenceConfig
from mates_megatron.influence.encoder import resolve_device
from mates_megatron.influence.group import influence_group
from mates_megatron.influence.registry import build_influence_model


class InfluenceRunner:
    """Owns the influence model (built by name from ``cfg.model``) and its process group.

    ``ranks`` (default: all) form the side group that fits and predicts; scores then reach every rank of
    the world by a broadcast from the group's first rank over a gloo group of the world. ``device`` is the
    training device; the influence model runs there unless ``cfg.device`` names another (CPU when neither is
    given). Collective at construction (the groups are created on every rank).
    """

    def __init__(
        self,
        cfg: InfluenceConfig,
        *,
        ranks: list[int] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device, device)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.ranks = (
            sorted(ranks)
            if ranks is not None
            else (list(range(dist.get_world_size())) if self.distributed else [0])
        )
        self.group = influence_group(self.ranks) if self.distributed else None
        subset = self.distributed and len(self.ranks) < dist.get_world_size()
        # Scores reach non-members over gloo (CPU tensors), never on the default group, which is NCCL on GPUs.
        self.world_group = influence_group() if subset else None
        self.member = not self.distributed or dist.get_rank() in self.ranks
        self.model: InfluenceModel | None = (
            build_influence_model(cfg, device=self.device) if self.member else None
        )
        """The influence model on members of the group; None elsewhere."""
        self.rounds_fitted = 0

    def score_round(
        self, texts: Sequence[str], probe_positions: np.ndarray, probe_scores: np.ndarray
    ) -> tuple[np.ndarray, float, float]:
        """Fit on the probes (``texts[probe_positions]`` with their oracle scores), predict every text.

        Returns (predicted scores, held-out Spearman, held-out Pearson), identical on every rank of the world
        (collective over the world). ``texts`` may decode on access (``pool.CandidateTexts``): a member reads
        the probes and its own shard only; a non-member reads nothing and may pass an empty sequence.
        """
        pred = torch.zeros(0, dtype=torch.float32)
        stats = torch.zeros(2, dtype=torch.float64)
        if self.member:
            scores, result = self.model.fit_predict(texts, probe_positions, probe_scores, group=self.group)
            pred = torch.from_numpy(scores.astype(np.float32))  # float32 already on the wire (gather_rows)
            stats = torch.tensor([result.spearman, result.pearson], dtype=torch.float64)
        if self.world_group is not None:
            src, group = self.ranks[0], self.world_group
            size = torch.tensor([len(pred)], dtype=torch.long)
            dist.broadcast(size, src=src, group=group)  # non-members do not know the pool's size
            if not self.member:
                pred = torch.zeros(int(size), dtype=torch.float32)
            dist.broadcast(pred, src=src, group=group)
            dist.broadcast(stats, src=src, group=group)
        self.rounds_fitted += 1  # on every rank: a checkpoint of any rank tells how many rounds were fitted
        return pred.numpy().astype(np.float64), float(stats[0]), float(stats[1])

    def state_dict(self) -> dict[str, Any]:
        """Rounds fitted (on every rank) and the model's state (None before the first fit and on
        non-members)."""
        model = self.model.state_dict() if self.model is not None else None
        return {"rounds_fitted": self.rounds_fitted, "model": model or None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds_fitted = int(state["rounds_fitted"])
        if state["model"] is not None and self.member:
            self.model.load_state_dict(state["model"])

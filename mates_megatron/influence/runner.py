"""One influence model across rounds: fit (warm or cold start), predict, share scores, checkpoint state."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mates_megatron.influence.fit import FitResult, fit, predict
from mates_megatron.influence.group import influence_group
from mates_megatron.influence.model import InfluenceConfig, InfluenceModel


class InfluenceRunner:
    """Owns the influence model and its process group.

    ``ranks`` (default: all) form the side group that fits and predicts; scores then reach every rank of
    the world by a broadcast from the group's first rank. With ``warm_start`` a round starts from the
    previous round's fitted weights; without, from the pretrained encoder and a zero head, as the
    reference implementation does every round.
    """

    def __init__(self, cfg: InfluenceConfig, *, ranks: list[int] | None = None) -> None:
        self.cfg = cfg
        self.distributed = dist.is_available() and dist.is_initialized()
        self.ranks = (
            sorted(ranks)
            if ranks is not None
            else (list(range(dist.get_world_size())) if self.distributed else [0])
        )
        self.group = influence_group(self.ranks) if self.distributed else None
        self.member = not self.distributed or dist.get_rank() in self.ranks
        self.model: InfluenceModel | None = None
        self.rounds_fitted = 0

    def _fresh(self) -> InfluenceModel:
        torch.manual_seed(self.cfg.seed)
        return InfluenceModel(self.cfg)

    def fit_round(self, texts: list[str], scores: np.ndarray) -> FitResult | None:
        """Fit on this round's (text, oracle score) pairs; None on ranks outside the influence group."""
        if not self.member:
            return None
        if self.model is None or not self.cfg.warm_start:
            self.model = self._fresh()
        result = fit(self.model, texts, scores, group=self.group)
        self.rounds_fitted += 1
        return result

    def predict(self, texts: list[str]) -> np.ndarray:
        """Scores of every text on every rank of the world (collective over the world)."""
        n = len(texts)
        out = torch.zeros(n, dtype=torch.float64)
        if self.member:
            if self.model is None:
                raise RuntimeError("the influence model has not been fitted yet: call fit_round first")
            out = torch.from_numpy(predict(self.model, texts, group=self.group))
        if self.distributed and len(self.ranks) < dist.get_world_size():
            dist.broadcast(out, src=self.ranks[0])
        return out.numpy()

    def state_dict(self) -> dict[str, Any]:
        model = self.model.state_dict() if self.model is not None else None
        return {"rounds_fitted": self.rounds_fitted, "model": model}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds_fitted = int(state["rounds_fitted"])
        if state["model"] is not None and self.member:
            self.model = self._fresh()
            self.model.load_state_dict(state["model"])

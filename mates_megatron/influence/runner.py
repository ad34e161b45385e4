"""One influence model across rounds: fit (warm or cold start), predict, share scores, checkpoint state."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mates_megatron.influence.fit import FitResult, embed, fit, fit_ridge, predict
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

    def score_round(
        self, texts: list[str], probe_positions: np.ndarray, probe_scores: np.ndarray
    ) -> tuple[np.ndarray, float, float]:
        """Fit on the probes (``texts[probe_positions]`` with their oracle scores), predict every text.

        Returns (predicted scores, held-out Spearman, held-out Pearson), identical on every rank of the world
        (collective over the world). With ``freeze_encoder`` every text is encoded once and the probes' rows of
        those embeddings fit the head in closed form; otherwise the encoder is fine-tuned on the probe texts.
        Non-members may pass an empty ``texts`` (they never read them).
        """
        out = torch.zeros(0, dtype=torch.float64)
        if self.member:
            if self.cfg.freeze_encoder:
                if self.model is None:
                    self.model = self._fresh()
                feats = embed(self.model, texts, group=self.group)
                result = fit_ridge(self.model, feats[probe_positions], probe_scores)
                pred = feats @ self.model.head.weight.detach().double().numpy()[0] + float(
                    self.model.head.bias.detach()
                )
                self.rounds_fitted += 1
            else:
                result = self.fit_round([texts[i] for i in probe_positions], probe_scores)
                pred = predict(self.model, texts, group=self.group)
            out = torch.from_numpy(np.concatenate([pred, [result.spearman, result.pearson]]))
        if self.distributed and len(self.ranks) < dist.get_world_size():
            size = torch.tensor([len(out)], dtype=torch.long)
            dist.broadcast(size, src=self.ranks[0])  # non-members do not know the pool's size
            if not self.member:
                out = torch.zeros(int(size), dtype=torch.float64)
            dist.broadcast(out, src=self.ranks[0])
        arr = out.numpy()
        return arr[:-2].copy(), float(arr[-2]), float(arr[-1])

    def state_dict(self) -> dict[str, Any]:
        model = None
        if self.model is not None:
            # A frozen encoder is the pretrained one: only the head is state.
            module = self.model.head if self.cfg.freeze_encoder else self.model
            model = {k: v.clone() for k, v in module.state_dict().items()}
        return {"rounds_fitted": self.rounds_fitted, "model": model}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds_fitted = int(state["rounds_fitted"])
        if state["model"] is not None and self.member:
            self.model = self._fresh()
            module = self.model.head if self.cfg.freeze_encoder else self.model
            module.load_state_dict(state["model"])

"""Influence model 'ridge': the pretrained encoder kept frozen, a linear head fitted in closed form.

The probes are embedded by the frozen encoder (``ridge.features``), sharded over the influence group, and their
features gathered on every member ([probes, hidden]: small); the head is ridge regression on them, its strength
chosen by cross-validated Spearman. Prediction streams over this member's contiguous shard of the candidates,
embedding a batch and keeping only its float32 scores, so host memory follows the shard's scores and not
[candidates, hidden]; the scores are gathered on every member.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from mates_megatron.influence.base import (
    FitResult,
    InfluenceModel,
    check_pairs,
    gather_rows,
    rank_size,
    shard,
)
from mates_megatron.influence.config import InfluenceConfig
from mates_megatron.influence.encoder import EncoderRegressor
from mates_megatron.influence.loader import batches as read_batches
from mates_megatron.influence.loader import spans
from mates_megatron.influence.registry import INFLUENCE_MODELS
from mates_megatron.progress import progress as progress_bar
from mates_megatron.stats import pearson, spearman


@INFLUENCE_MODELS.register("ridge")
class RidgeInfluenceModel(InfluenceModel):
    """See ``InfluenceModel``; the state is the head alone (the encoder is the pretrained one)."""

    name = "ridge"

    def __init__(self, cfg: InfluenceConfig, *, device: str | torch.device | None = None) -> None:
        super().__init__(cfg, device=device)
        self.net: EncoderRegressor | None = None
        """The frozen encoder and the fitted head: None until the first fit or load_state_dict."""

    def _network(self) -> EncoderRegressor:
        if self.net is None:
            torch.manual_seed(self.cfg.seed)
            self.net = EncoderRegressor(self.cfg).to(self.device).requires_grad_(False)
        return self.net

    def embed(self, texts: Sequence[str], *, group=None) -> np.ndarray:
        """The frozen features [n, hidden] (float64) of every text, on every member of ``group``."""
        return embed(self._network(), texts, group=group, batch_size=self.cfg.predict_batch_size)

    def fit(self, texts: Sequence[str], scores: np.ndarray, *, group=None, device_group=None) -> FitResult:
        check_pairs(len(texts), scores, "fit_ridge")  # a closed form: no tensor collective in the fit
        return fit_ridge(self._network(), self.embed(texts, group=group), scores)

    def predict(self, texts: Sequence[str], *, group=None) -> np.ndarray:
        if self.net is None:
            raise RuntimeError("the influence model has not been fitted: call fit or load_state_dict first")
        net = self.net
        net.eval()
        w = net.head.weight.detach().double().cpu().numpy()[0]
        b = float(net.head.bias.detach())
        lo, hi, per = shard(len(texts), group)
        out = torch.zeros(per, dtype=torch.float32)
        parts = spans(lo, hi, self.cfg.predict_batch_size)
        show = rank_size(group)[0] == 0
        for part, feats in progress_bar(
            zip(parts, streamed_features(net, texts, parts), strict=True),
            total=len(parts), desc="influence predict", leave=False, disable=not show,
        ):  # fmt: skip
            out[part.start - lo : part.stop - lo] = torch.from_numpy(feats @ w + b)
        return gather_rows(out, len(texts), group).astype(np.float64)

    def state_dict(self) -> dict[str, Any]:
        if self.net is None:
            return {}
        return {k: v.detach().to("cpu", copy=True) for k, v in self.net.head.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.net = None
            self._network().head.load_state_dict(state)


@torch.no_grad()
def features(net: EncoderRegressor, texts: Sequence[str]) -> np.ndarray:
    """Features [len(texts), hidden] (float64, CPU) of one batch by ``net.cfg.ridge.features``: mean-pooled
    encoder states, or mean input token embeddings."""
    if net.cfg.ridge.features == "token_embeddings":
        return net.embed_tokens(list(texts)).double().cpu().numpy()
    ids, mask = net.encode_texts(list(texts))
    return net.embed(ids.to(net.device), mask.to(net.device)).double().cpu().numpy()


@torch.no_grad()
def streamed_features(
    net: EncoderRegressor, texts: Sequence, parts: list, *, workers: int | None = None
) -> Iterator[np.ndarray]:
    """``features`` of the texts at each of ``parts`` in turn, read and tokenised by ``workers`` loader
    workers (None: ``cfg.loader_workers``) while the previous batch is embedded."""
    static = net.cfg.ridge.features == "token_embeddings"
    transform = net.chunker.tokens if static else net.chunker.encode
    cfg = net.cfg
    workers = cfg.loader_workers if workers is None else workers
    for batch in read_batches(
        texts, parts, transform, workers=workers, device=net.device, timeout_s=cfg.timeout_s
    ):
        feats = (
            net.embed_tokens(batch)
            if static
            else net.embed(batch.input_ids, batch.attention_mask, batch.keep)
        )
        yield feats.double().cpu().numpy()


def embed(net: EncoderRegressor, texts: Sequence[str], *, group=None, batch_size: int = 256) -> np.ndarray:
    """Features [n, hidden] (float64) of every text, sharded over ``group`` and gathered on every member:
    for the probes of a fit, never for a whole round (``predict`` streams)."""
    net.eval()
    lo, hi, per = shard(len(texts), group)
    out = torch.zeros(per, net.encoder.config.hidden_size, dtype=torch.float64)
    parts = spans(lo, hi, batch_size)
    show = rank_size(group)[0] == 0
    for part, chunk in progress_bar(
        zip(parts, streamed_features(net, texts, parts), strict=True),
        total=len(parts), desc="influence embed", leave=False, disable=not show,
    ):  # fmt: skip
        out[part.start - lo : part.stop - lo] = torch.from_numpy(chunk)
    return gather_rows(out, len(texts), group)


def ridge_solve(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Weights and intercept of ridge regression on standardised columns, mapped back to raw features."""
    mu, sd = x.mean(0), x.std(0) + 1e-8
    a = (x - mu) / sd
    y0 = y.mean()
    w = np.linalg.solve(a.T @ a + alpha * len(a) * np.eye(a.shape[1]), a.T @ (y - y0)) / sd
    return w, float(y0 - mu @ w)


def fit_ridge(net: EncoderRegressor, feats: np.ndarray, scores: np.ndarray) -> FitResult:
    """Fit the head of a frozen-encoder network in closed form on precomputed ``embed`` features.

    Targets are z-scored. Each of ``ridge.alphas`` is scored by ``ridge.folds``-fold cross-validation (the
    Spearman of the out-of-fold predictions over every pair, steadier than one small held-out split); the
    head is then refitted on all pairs with the best. Deterministic, no process group.
    """
    cfg = net.cfg
    alphas, folds = cfg.ridge.alphas, cfg.ridge.folds
    scores = check_pairs(len(feats), scores, "fit_ridge")
    target = (scores - scores.mean()) / (scores.std() or 1.0)
    fold_of = np.random.default_rng([cfg.seed, 7]).permutation(len(scores)) % folds
    history, best = [], (-math.inf, math.nan, 0)
    for i, alpha in enumerate(alphas):
        pred = np.zeros(len(scores))
        for f in range(folds):
            w, b = ridge_solve(feats[fold_of != f], target[fold_of != f], alpha)
            pred[fold_of == f] = feats[fold_of == f] @ w + b
        sp, pe = spearman(pred, scores), pearson(pred, scores)
        history.append({"alpha": alpha, "spearman": sp, "pearson": pe})
        if sp > best[0]:
            best = (sp, pe, i)
    if math.isinf(best[0]):  # no strength gave a defined Spearman (constant predictions): report it as such
        best = (math.nan, math.nan, 0)
    w, b = ridge_solve(feats, target, alphas[best[2]])
    net.head.weight.data.copy_(torch.from_numpy(w).float().view(1, -1))
    net.head.bias.data.fill_(b)
    return FitResult(spearman=best[0], pearson=best[1], best=best[2], history=history)

"""Influence model 'relational' (Group-MATES, Yu et al. 2025; ``modeling_data_influence_model.py``,
``RelationalModel``): a sample's score given the samples trained on before it.

The authors' model: an encoder with a linear head gives each sample its own score s_i; in a rollout (a
sequence of samples trained on in order) the i-th member scores ``s_i * alpha * mean_{j<i}(1 - <e_i, e_j> /
temp)`` (the first member: s_0), with e the normalised embeddings and ``alpha``, ``temp`` learned (both start
at 1); trained by MSE against the rollouts' per-step reference-loss changes, z-scored. Here the encoder is
kept frozen, as model 'ridge' keeps it (``ridge.features``: its features and its streamed prediction), and the
head, alpha and temperature are fitted together by full-batch Adam from the ridge solution
(``fit_relational``); the relationship reads the L2-normalised features.

The probes must be a rollout estimator's (``estimator: rollout`` or ``linearized_rollout``): consecutive runs of
``relational.rollout_length`` probes are the rollouts. ``predict`` gives each candidate its own score (the
head), as the authors' selection does; the selector ('cluster_greedy') adds the relationships.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mates_megatron.influence.base import FitResult, check_pairs
from mates_megatron.influence.config import RelationalConfig
from mates_megatron.influence.registry import INFLUENCE_MODELS
from mates_megatron.influence.ridge import RidgeInfluenceModel, ridge_solve
from mates_megatron.selectors.group import relational_scores
from mates_megatron.stats import pearson, spearman


@dataclass
class RelationalFit:
    """A fitted relational model on raw features: own score ``feats @ w + b``; the relationship's terms."""

    w: np.ndarray
    b: float
    alpha: float
    temperature: float


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _rollouts(n: int, length: int) -> list[np.ndarray]:
    return [np.arange(i, min(n, i + length)) for i in range(0, n, length)]


def relational_predict(feats: np.ndarray, fit: RelationalFit, length: int) -> np.ndarray:
    """Each probe's relational score inside its rollout (consecutive runs of ``length``)."""
    own = np.asarray(feats, dtype=np.float64) @ fit.w + fit.b
    unit = unit_rows(feats)
    out = own.copy()
    for idx in _rollouts(len(own), length):
        out[idx] = relational_scores(own[idx], unit[idx], alpha=fit.alpha, temperature=fit.temperature)
    return out


def step_ladder(steps: int) -> list[int]:
    """The step counts ``RelationalConfig.early_stop`` chooses among: 0 (the ridge start), 1, 3, 10, 30, ...
    below ``steps``, and ``steps``."""
    ladder, k = [0], 1
    while k < steps:
        ladder.append(k)
        k = k * 3 if len(ladder) % 2 == 0 else k * 10 // 3
    return [*ladder, steps]


def _train(
    feats: np.ndarray, target: np.ndarray, cfg: RelationalConfig, seed: int, at: Sequence[int] | None = None
) -> list[RelationalFit]:
    """Head, alpha and temperature by Adam on the relational MSE, in standardised feature space: the fit after
    each step count of ``at`` (ascending; None: ``[cfg.steps]``)."""
    at = [cfg.steps] if at is None else list(at)
    mu, sd = feats.mean(0), feats.std(0) + 1e-8
    w0, b0 = ridge_solve(feats, target, 1.0)  # the individual fit (on raw features) as the start
    torch.manual_seed(seed)
    x = torch.from_numpy((feats - mu) / sd)
    w = torch.tensor(w0 * sd, requires_grad=True)  # the same head in standardised space
    b = torch.tensor(b0 + float(mu @ w0), requires_grad=True)
    alpha = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    temp = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    unit = torch.from_numpy(unit_rows(feats))
    y = torch.from_numpy(target)
    idx = _rollouts(len(target), cfg.rollout_length)
    # Pad the rollouts to one [R, L] block: position k of a rollout averages its relationships to 0..k-1.
    length = cfg.rollout_length
    pos = torch.full((len(idx), length), -1, dtype=torch.long)
    for r, i in enumerate(idx):
        pos[r, : len(i)] = torch.from_numpy(i)
    valid = pos >= 0
    safe = pos.clamp(min=0)
    earlier = torch.tril(torch.ones(length, length, dtype=torch.float64), diagonal=-1)
    counts = earlier.sum(1).clamp(min=1)
    dots = torch.einsum("rkd,rjd->rkj", unit[safe], unit[safe])
    opt = torch.optim.Adam([w, b, alpha, temp], lr=cfg.lr)

    def snapshot() -> RelationalFit:
        w_raw = w.detach().numpy().copy() / sd
        return RelationalFit(
            w=w_raw, b=float(b.detach()) - float(mu @ w_raw), alpha=float(alpha.detach()),
            temperature=float(temp.detach().clamp(min=1e-3)),
        )  # fmt: skip

    fits = [snapshot() for s in at if s == 0]
    for step in range(1, at[-1] + 1):
        opt.zero_grad()
        own = (x @ w + b)[safe]
        rel = alpha * (1.0 - dots / temp.clamp(min=1e-3)) * earlier * valid[:, None, :]
        factor = torch.where(torch.arange(length)[None, :] == 0, torch.ones_like(own), rel.sum(2) / counts)
        pred = own * factor
        loss = ((pred - y[safe]) ** 2)[valid].mean()
        if cfg.head_l2:
            loss = loss + cfg.head_l2 * (w**2).sum()
        loss.backward()
        opt.step()
        fits += [snapshot() for s in at if s == step]
    return fits


def center_positions(scores: np.ndarray, length: int) -> np.ndarray:
    """Each score minus the mean score at its position in the rollouts (``RelationalConfig.center_positions``)."""
    scores = np.asarray(scores, dtype=np.float64)
    pos = np.arange(len(scores)) % length
    means = np.bincount(pos, weights=scores, minlength=length) / np.maximum(
        np.bincount(pos, minlength=length), 1
    )
    return scores - means[pos]


def deconvolve(scores: np.ndarray, length: int, beta: float) -> np.ndarray:
    """Each rollout step's score less ``beta`` x the score of the step before it in its rollout (the first step
    of each rollout unchanged): ``RelationalConfig.deconvolve``."""
    scores = np.asarray(scores, dtype=np.float64)
    out = scores.copy()
    for idx in _rollouts(len(scores), length):
        out[idx[1:]] -= beta * scores[idx[:-1]]
    return out


def relational_targets(scores: np.ndarray, cfg: RelationalConfig) -> np.ndarray:
    """What the fit regresses on, before its z-score: the rollouts' scores, deconvolved (``cfg.deconvolve``),
    then centred per position (``cfg.center_positions``); the scores themselves when neither is set."""
    scores = np.asarray(scores, dtype=np.float64)
    if cfg.deconvolve:
        scores = deconvolve(scores, cfg.rollout_length, cfg.deconvolve)
    if cfg.center_positions:
        scores = center_positions(scores, cfg.rollout_length)
    return scores


def fit_head(feats: np.ndarray, scores: np.ndarray, cfg: RelationalConfig, *, seed: int) -> RelationalFit:
    """The relational fit on every rollout of ``scores`` (``relational_targets``, z-scored), without the
    cross-validation: ``fit_relational``'s fit."""
    if cfg.early_stop:  # the step count is chosen by the cross-validation
        return fit_relational(feats, scores, cfg, seed=seed)[0]
    target = relational_targets(scores, cfg)
    z = (target - target.mean()) / (target.std() or 1.0)
    return _train(np.asarray(feats, dtype=np.float64), z, cfg, seed)[0]


def fit_relational(
    feats: np.ndarray, scores: np.ndarray, cfg: RelationalConfig, *, seed: int
) -> tuple[RelationalFit, FitResult]:
    """The relational fit on z-scored targets, with the out-of-fold Spearman/Pearson of its relational scores
    over whole rollouts (``cfg.folds`` folds, seeded), then refitted on every rollout. Deterministic.

    With ``cfg.early_stop`` the folds are read after each step count of ``step_ladder(cfg.steps)`` and the
    count with the best out-of-fold Spearman is refitted on every rollout (the fewest steps on a tie); the
    Spearman reported is that count's, chosen on the same folds (as the authors report their best epoch's)."""
    scores = relational_targets(check_pairs(len(feats), scores, "fit_relational"), cfg)
    feats = np.asarray(feats, dtype=np.float64)
    idx = _rollouts(len(scores), cfg.rollout_length)
    target = (scores - scores.mean()) / (scores.std() or 1.0)
    folds = min(cfg.folds, len(idx))
    fold_of = np.random.default_rng([seed, 7]).permutation(len(idx)) % folds
    ladder = step_ladder(cfg.steps) if cfg.early_stop else [cfg.steps]
    preds = np.zeros((len(ladder), len(scores)))
    for f in range(folds):
        train = np.concatenate([i for i, g in zip(idx, fold_of, strict=True) if g != f])
        held = [i for i, g in zip(idx, fold_of, strict=True) if g == f]
        for k, fit in enumerate(_train(feats[train], target[train], cfg, seed, at=ladder)):
            for i in held:  # a held-out rollout, scored as a whole
                preds[k, i] = relational_predict(feats[i], fit, cfg.rollout_length)
    sps = [spearman(p, scores) for p in preds]
    best = max(range(len(ladder)), key=lambda k: (sps[k] if math.isfinite(sps[k]) else -math.inf, -k))
    sp, pe = sps[best], pearson(preds[best], scores)
    fit = _train(feats, target, cfg, seed, at=[ladder[best]])[0]
    history = (
        [{"steps": s, "spearman": v} for s, v in zip(ladder, sps, strict=True)] if cfg.early_stop else []
    )
    result = FitResult(spearman=sp if math.isfinite(sp) else math.nan, pearson=pe, best=0,
                       history=[*history, {"alpha": fit.alpha, "temperature": fit.temperature, "spearman": sp,
                                           "steps": ladder[best]}])  # fmt: skip
    return fit, result


@INFLUENCE_MODELS.register("relational")
class RelationalInfluenceModel(RidgeInfluenceModel):
    """See the module; the state is the head, alpha and temperature (the encoder is the pretrained one)."""

    name = "relational"

    def __init__(self, cfg, *, device=None) -> None:
        super().__init__(cfg, device=device)
        self.alpha, self.temperature = 1.0, 1.0

    def fit(self, texts, scores: np.ndarray, *, group=None, device_group=None) -> FitResult:
        check_pairs(len(texts), scores, "fit_relational")
        net = self._network()
        fit, result = fit_relational(self.embed(texts, group=group), scores, self.cfg.relational,
                                     seed=self.cfg.seed)  # fmt: skip
        net.head.weight.data.copy_(torch.from_numpy(fit.w).float().view(1, -1))
        net.head.bias.data.fill_(fit.b)
        self.alpha, self.temperature = fit.alpha, fit.temperature
        return result

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        return {**state, "alpha": self.alpha, "temperature": self.temperature} if state else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            state = dict(state)
            self.alpha, self.temperature = float(state.pop("alpha")), float(state.pop("temperature"))
            super().load_state_dict(state)

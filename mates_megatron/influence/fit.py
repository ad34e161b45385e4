"""Fit the influence model on (text, oracle score) pairs and predict over a pool, on a side process group.

Data parallel over the influence group: each member takes its share of every batch, gradients are averaged
over the group; prediction shards the texts in contiguous blocks and gathers the scores in input order.
With ``group=None`` everything runs in this process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from mates_megatron.influence.model import InfluenceModel
from mates_megatron.stats import spearman


@dataclass
class FitResult:
    spearman: float
    """Held-out Spearman of the kept (best) checkpoint."""
    pearson: float
    """Held-out Pearson of the kept checkpoint."""
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def _rank_size(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _show(group) -> bool:
    return _rank_size(group)[0] == 0


def _allreduce_mean_grads(model: torch.nn.Module, group) -> None:
    if group is None or dist.get_world_size(group) == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            p.grad /= dist.get_world_size(group)


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng([seed, 7]).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def fit(model: InfluenceModel, texts: list[str], scores: np.ndarray, *, group=None) -> FitResult:
    """MSE on z-scored scores; keeps the epoch with the best held-out Spearman. Collective over ``group``."""
    cfg = model.cfg
    scores = np.asarray(scores, dtype=np.float64)
    if len(texts) != len(scores):
        raise ValueError(f"fit got {len(texts)} texts and {len(scores)} scores")
    if not np.isfinite(scores).all():
        raise ValueError(
            f"{int((~np.isfinite(scores)).sum())} oracle scores are NaN/inf: fix the probes before fitting"
        )
    if len(texts) < 10:
        raise ValueError(f"fit needs at least 10 (text, score) pairs, got {len(texts)}")
    train_idx, val_idx = split(len(texts), cfg.val_fraction, cfg.seed)
    mu, sd = scores[train_idx].mean(), scores[train_idx].std() or 1.0
    target = torch.tensor((scores - mu) / sd, dtype=torch.float32)
    rank, size = _rank_size(group)
    opt = torch.optim.AdamW(
        [
            {"params": model.encoder.parameters(), "lr": cfg.lr},
            {"params": model.head.parameters(), "lr": cfg.head_lr},
        ]
    )
    best = (-math.inf, math.nan, -1, None)
    history = []
    steps = math.ceil(len(train_idx) / cfg.batch_size)
    for epoch in range(cfg.epochs):
        model.train()
        order = train_idx[np.random.default_rng([cfg.seed, epoch]).permutation(len(train_idx))]
        for s in tqdm(
            range(steps), desc=f"influence fit epoch {epoch + 1}", leave=False, disable=not _show(group)
        ):
            batch = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            mine = batch[rank::size]
            opt.zero_grad()
            if len(mine):
                ids, mask = model.encode_texts([texts[i] for i in mine])
                pred = model(ids, mask)
                # Sum over my share / the whole batch: the group average is the batch's mean loss.
                loss = torch.sum((pred - target[mine]) ** 2) / len(batch) * size
                loss.backward()
            else:  # an empty share still joins the all-reduce with zero gradients
                for p in model.parameters():
                    p.grad = torch.zeros_like(p)
            _allreduce_mean_grads(model, group)
            opt.step()
        pred_val = predict(model, [texts[i] for i in val_idx], group=group, progress=False)
        sp, pe = spearman(pred_val, scores[val_idx]), float(np.corrcoef(pred_val, scores[val_idx])[0, 1])
        history.append({"epoch": epoch, "spearman": sp, "pearson": pe})
        if sp > best[0]:
            best = (sp, pe, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[3])
    return FitResult(spearman=best[0], pearson=best[1], best_epoch=best[2], history=history)


@torch.no_grad()
def predict(
    model: InfluenceModel, texts: list[str], *, group=None, batch_size: int = 32, progress: bool = True
) -> np.ndarray:
    """Predicted (z-scored) influence of every text, in input order, on every member of ``group``."""
    model.eval()
    rank, size = _rank_size(group)
    n = len(texts)
    per = math.ceil(n / size)
    lo, hi = min(rank * per, n), min((rank + 1) * per, n)
    out = torch.zeros(per, dtype=torch.float64)
    for s in tqdm(
        range(lo, hi, batch_size),
        desc="influence predict",
        leave=False,
        disable=not (progress and _show(group)),
    ):
        ids, mask = model.encode_texts(texts[s : min(s + batch_size, hi)])
        out[s - lo : s - lo + ids.shape[0]] = model(ids, mask).double()
    if group is not None and size > 1:
        parts = [torch.zeros(per, dtype=torch.float64) for _ in range(size)]
        dist.all_gather(parts, out, group=group)
        out = torch.cat(parts)
    return out[:n].numpy()


@torch.no_grad()
def embed(model: InfluenceModel, texts: list[str], *, group=None, batch_size: int = 32) -> np.ndarray:
    """Mean-pooled encoder embeddings [n, hidden] (float64) of every text, on every member of ``group``."""
    model.eval()
    rank, size = _rank_size(group)
    n, dim = len(texts), model.encoder.config.hidden_size
    per = math.ceil(n / size)
    lo, hi = min(rank * per, n), min((rank + 1) * per, n)
    out = torch.zeros(per, dim, dtype=torch.float64)
    static = model.cfg.features == "token_embeddings"
    for s in tqdm(range(lo, hi, batch_size), desc="influence embed", leave=False, disable=not _show(group)):
        chunk = texts[s : min(s + batch_size, hi)]
        if static:
            out[s - lo : s - lo + len(chunk)] = model.embed_tokens(chunk).double()
        else:
            ids, mask = model.encode_texts(chunk)
            out[s - lo : s - lo + ids.shape[0]] = model.embed(ids, mask).double()
    if group is not None and size > 1:
        parts = [torch.zeros(per, dim, dtype=torch.float64) for _ in range(size)]
        dist.all_gather(parts, out, group=group)
        out = torch.cat(parts)
    return out[:n].numpy()


def ridge_solve(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Weights and intercept of ridge regression on standardised columns, mapped back to raw features."""
    mu, sd = x.mean(0), x.std(0) + 1e-8
    a = (x - mu) / sd
    y0 = y.mean()
    w = np.linalg.solve(a.T @ a + alpha * len(a) * np.eye(a.shape[1]), a.T @ (y - y0)) / sd
    return w, float(y0 - mu @ w)


def fit_ridge(model: InfluenceModel, features: np.ndarray, scores: np.ndarray, folds: int = 5) -> FitResult:
    """Fit the head of a frozen-encoder model in closed form on precomputed ``embed`` features.

    Targets are z-scored like ``fit``. Each of ``cfg.ridge_alphas`` is scored by ``folds``-fold cross-
    validation (the Spearman of the out-of-fold predictions over every pair, steadier than one small held-out
    split); the head is then refitted on all pairs with the best. Deterministic, no process group.
    """
    cfg = model.cfg
    scores = np.asarray(scores, dtype=np.float64)
    if len(features) != len(scores):
        raise ValueError(f"fit_ridge got {len(features)} feature rows and {len(scores)} scores")
    if not np.isfinite(scores).all():
        raise ValueError(
            f"{int((~np.isfinite(scores)).sum())} oracle scores are NaN/inf: fix the probes before fitting"
        )
    if len(scores) < 10:
        raise ValueError(f"fit_ridge needs at least 10 (text, score) pairs, got {len(scores)}")
    target = (scores - scores.mean()) / (scores.std() or 1.0)
    fold_of = np.random.default_rng([cfg.seed, 7]).permutation(len(scores)) % folds
    history, best = [], (-math.inf, math.nan, 0)
    for i, alpha in enumerate(cfg.ridge_alphas):
        pred = np.zeros(len(scores))
        for f in range(folds):
            w, b = ridge_solve(features[fold_of != f], target[fold_of != f], alpha)
            pred[fold_of == f] = features[fold_of == f] @ w + b
        sp = spearman(pred, scores)
        pe = float(np.corrcoef(pred, scores)[0, 1]) if pred.std() > 0 else math.nan
        history.append({"alpha": alpha, "spearman": sp, "pearson": pe})
        if sp > best[0]:
            best = (sp, pe, i)
    w, b = ridge_solve(features, target, cfg.ridge_alphas[best[2]])
    model.head.weight.data.copy_(torch.from_numpy(w).float().view(1, -1))
    model.head.bias.data.fill_(b)
    return FitResult(spearman=best[0], pearson=best[1], best_epoch=best[2], history=history)

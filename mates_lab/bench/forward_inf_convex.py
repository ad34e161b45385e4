"""Forward-INF's convex check (Ko et al., CVPR 2024, Sec. 3 / Fig. 2): leave-one-out against dual leave-one-out.

The mirrored influence hypothesis: how much training point z_i helps a test point z (leave-one-out,
``LOO_i = l(z; A(D - z_i)) - l(z; A(D))``) is mirrored by how much training on z helps z_i (dual,
``DUAL_i = l(z_i; A(D)) - l(z_i; A(D + z))``). The paper checks it first where both are exact: an
L2-regularised logistic regression, retrained to convergence for every i, reporting Pearson 0.999.

Here, on scikit-learn's ``load_breast_cancer`` (standardised, an intercept column): ``train`` rows, ``queries``
test rows per seed, every model fitted by Newton's method to a gradient norm below 1e-10 (exact up to float
rounding; the objective is strictly convex). Per query, over the training rows:

- ``dual``: the exact dual leave-one-out above (the hypothesis itself);
- ``forward_step``: what the tracer computes (``mates_megatron.trace.forward_inf``): the training rows' loss
  change after one gradient step of size ``lr`` on the query alone, from the trained weights (no retraining);
- ``gradient_dot``: ``g_i . g_z`` at the trained weights (the tracer's ``gradient-dot`` baseline; the step's
  first-order term).

each set beside exact LOO by Pearson and Spearman. ``mates-lab bench forward-inf-convex`` writes the figures.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mates_megatron.stats import pearson, spearman

LAMBDA = 1e-2
"""L2 strength of the objective ``sum_i c_i l_i(w) + LAMBDA / 2 * n * |w|^2`` (scaled with n so that one
point's weight is 1/n of the data term, as in a mean loss)."""


def _loss(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row logistic loss, labels in {-1, +1}."""
    return np.logaddexp(0.0, -y * (x @ w))


def _grad(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row gradient of the logistic loss [rows, features]."""
    s = 1.0 / (1.0 + np.exp(y * (x @ w)))  # sigmoid(-y w.x)
    return -(y * s)[:, None] * x


def fit(x: np.ndarray, y: np.ndarray, c: np.ndarray, reg: float, w0: np.ndarray | None = None) -> np.ndarray:
    """Newton's method on ``sum c_i l_i + reg / 2 |w|^2`` to a gradient norm below 1e-10."""
    w = np.zeros(x.shape[1]) if w0 is None else w0.copy()
    for _ in range(100):
        m = x @ w
        p = 1.0 / (1.0 + np.exp(-y * m))
        g = x.T @ (c * -(y * (1 - p))) + reg * w
        if np.linalg.norm(g) < 1e-10:
            return w
        h = (x * (c * p * (1 - p))[:, None]).T @ x + reg * np.eye(x.shape[1])
        w = w - np.linalg.solve(h, g)
    raise RuntimeError("Newton's method did not converge in 100 steps")


def convex_check(*, seeds=(0, 1, 2), train: int = 200, queries: int = 5, lr: float = 0.05) -> dict[str, Any]:
    """Per seed and query: Pearson and Spearman of ``dual``, ``forward_step`` and ``gradient_dot`` against LOO
    over the training rows; means over every (seed, query)."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    data = load_breast_cancer()
    x_all = StandardScaler().fit_transform(data.data)
    x_all = np.hstack([x_all, np.ones((len(x_all), 1))])
    y_all = np.where(data.target == 1, 1.0, -1.0)
    reg = LAMBDA * train
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        order = np.random.default_rng(seed).permutation(len(x_all))
        tr, te = order[:train], order[train : train + queries]
        x, y = x_all[tr], y_all[tr]
        ones = np.ones(train)
        w = fit(x, y, ones, reg)
        base_train = _loss(w, x, y)
        # Leave-one-out weights, one refit per training row (warm-started at w: the same optimum, sooner).
        w_loo = [fit(x, y, np.where(np.arange(train) == i, 0.0, 1.0), reg, w) for i in range(train)]
        g_train = _grad(w, x, y)
        for q in te:
            xq, yq = x_all[q : q + 1], y_all[q : q + 1]
            base_q = float(_loss(w, xq, yq)[0])
            loo = np.array([float(_loss(wi, xq, yq)[0]) - base_q for wi in w_loo])
            w_dual = fit(np.vstack([x, xq]), np.concatenate([y, yq]), np.append(ones, 1.0), reg, w)
            dual = base_train - _loss(w_dual, x, y)
            stepped = w - lr * _grad(w, xq, yq)[0]
            forward = base_train - _loss(stepped, x, y)
            dot = g_train @ _grad(w, xq, yq)[0]
            row = {"seed": int(seed), "query": int(q)}
            for name, v in (("dual", dual), ("forward_step", forward), ("gradient_dot", dot)):
                row[name] = {"pearson": pearson(loo, v), "spearman": spearman(loo, v)}
            rows.append(row)
    methods = ("dual", "forward_step", "gradient_dot")
    mean = {m: {k: float(np.mean([r[m][k] for r in rows])) for k in ("pearson", "spearman")} for m in methods}
    worst = {m: {k: float(np.min([r[m][k] for r in rows])) for k in ("pearson", "spearman")} for m in methods}
    return {
        "dataset": "sklearn load_breast_cancer (standardised + intercept)",
        "train": train,
        "queries_per_seed": queries,
        "seeds": list(seeds),
        "l2_per_row": LAMBDA,
        "forward_step_lr": lr,
        "per_query": rows,
        "mean_vs_loo": mean,
        "min_vs_loo": worst,
        "paper": {"dual_vs_loo_pearson": 0.999},
    }

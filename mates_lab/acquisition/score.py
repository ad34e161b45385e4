"""Checking and scoring a purchase: ``{seller name: rows}``.

The score of a purchase is the test accuracy of a logistic regression trained on it, averaged over ``draws``
seeded draws: in draw ``r`` the bought number of rows is drawn from each seller's hidden rows without
replacement (``default_rng([seed, r, tag])``), a ``LogisticRegression(max_iter=1000)`` (lbfgs, deterministic)
is fitted (one BLAS thread), and its accuracy is taken on the hidden test set. Degenerate purchases:

- rows of one class only (in a draw): the model predicts that class (a classifier cannot be fitted);
- no rows: the model predicts the majority class of the buyer's eval set (the smallest label on a tie), the
  same in every draw.

The leaderboard figure is DataPerf DAM's ``dam_score = 0.98 * accuracy + 0.02 * (budget - cost) / budget``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from mates_lab.acquisition.market import Market, MarketError, MarketView

MAX_ITER = 1000
"""Iterations of the logistic regression's solver."""
_DRAW_TAG = 0x5C0
# Relative slack of the budget check: prices are decimals that floats hold only approximately.
_TOLERANCE = 1e-9


def cost(market: Market | MarketView, purchase: dict[str, int]) -> float:
    """Sum of price x rows (sellers absent from the purchase buy nothing)."""
    prices = {s.name: s.price for s in market.sellers}
    return math.fsum(prices[name] * int(n) for name, n in purchase.items() if name in prices)


def within_budget(spent: float, budget: float) -> bool:
    return spent <= budget * (1 + _TOLERANCE) + _TOLERANCE


def validate_purchase(market: Market | MarketView, purchase: dict[str, int]) -> dict[str, int]:
    """The purchase as ``{seller: int rows}`` over every seller (0 where absent); MarketError naming the
    seller and the numbers for an unknown seller, a count that is not a whole number >= 0, a count over the
    seller's rows, or a total cost over the budget."""
    if not isinstance(purchase, dict):
        raise MarketError(f"a purchase is a dict {{seller name: rows}}, got {type(purchase).__name__}")
    available = {s.name: s.rows for s in market.sellers}
    out = dict.fromkeys(available, 0)
    for name, n in purchase.items():
        if name not in available:
            raise MarketError(
                f"purchase names seller {name!r}, which this market does not have (sellers: {', '.join(available)})"
            )
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise MarketError(
                f"purchase of {n!r} rows from seller {name!r}: the count must be a whole number (int)"
            )
        if n < 0:
            raise MarketError(f"purchase of {int(n)} rows from seller {name!r}: the count must be >= 0")
        if n > available[name]:
            raise MarketError(
                f"purchase of {int(n)} rows from seller {name!r}: the seller has only {available[name]} rows"
            )
        out[name] = int(n)
    spent = cost(market, out)
    if not within_budget(spent, market.budget):
        raise MarketError(f"purchase costs {spent:.6g}, over the budget {market.budget:.6g}: buy fewer rows")
    return out


def fit_predict(x: np.ndarray, y: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Predictions on ``test`` of a logistic regression fitted on (x, y); one class: that class."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    classes = np.unique(y)
    if len(classes) == 1:
        return np.full(len(test), classes[0])
    # One BLAS thread: the same figures whatever the machine's threads (and no oversubscription, which made
    # a fit 10x slower beside torch on 2 cores).
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # capped iterations are part of the rule
        model = LogisticRegression(max_iter=MAX_ITER).fit(x, y)
    return model.predict(test)


def draw_purchase(market: Market, purchase: dict[str, int], rng: np.random.Generator):
    """The rows of one draw of a (validated) purchase: features and labels, sellers in market order."""
    xs, ys = [], []
    for s in market.sellers:
        n = purchase.get(s.name, 0)
        if n:
            idx = rng.choice(s.rows, size=n, replace=False)
            xs.append(s.features[idx])
            ys.append(s.labels[idx])
    if not xs:
        return None, None
    return np.concatenate(xs), np.concatenate(ys)


def score(market: Market, purchase: dict[str, int], *, draws: int = 5, seed: int = 0) -> dict[str, Any]:
    """Mean test accuracy over ``draws`` seeded draws, every draw's accuracy, the cost and ``dam_score``."""
    if not isinstance(market, Market):
        raise TypeError("score needs the full Market (its hidden rows and test set), not a MarketView")
    if draws < 1:
        raise ValueError(f"draws={draws} must be >= 1")
    bought = validate_purchase(market, purchase)
    spent = cost(market, bought)
    accs = []
    for r in range(draws):
        x, y = draw_purchase(market, bought, np.random.default_rng([seed, r, _DRAW_TAG]))
        if x is None:
            pred = np.full(len(market.test_labels), np.bincount(market.eval_labels).argmax())
        else:
            pred = fit_predict(x, y, market.test_features)
        accs.append(float(np.mean(pred == market.test_labels)))
    acc = float(np.mean(accs))
    return {
        "accuracy": acc,
        "accuracies": accs,
        "cost": spent,
        "budget": market.budget,
        "cost_share": spent / market.budget,
        "rows": sum(bought.values()),
        "dam_score": dam_score(acc, spent, market.budget),
    }


def dam_score(accuracy: float, spent: float, budget: float) -> float:
    """DataPerf DAM's leaderboard figure."""
    return 0.98 * accuracy + 0.02 * (budget - spent) / budget

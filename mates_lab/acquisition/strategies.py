"""Buyer strategies: ``(view: MarketView, seed: int) -> {seller name: rows}``, never over the budget nor over
a seller's rows (``run_strategy`` checks both). A strategy sees only the public view.

- ``uniform``: the budget split equally over the sellers; each buys floor(share / price) rows, capped at its
  rows; the money a capped seller leaves is split again over the others, pass after pass.
- ``cheapest``: the cheapest seller first, as many rows as the money buys, then the next.
- ``lava``: labelled LAVA values (``ot.valuation.lava_values``, the settings of ``bench ot``'s flip recall)
  of every seller's sample rows against the buyer's eval set. A seller's LAVA value is the mean over its
  sample rows (higher = more harmful); its worth is ``max_s v_s - v_s`` plus 1% of the spread of the v_s (so
  the worst seller is worth a little, not nothing); sellers are bought in decreasing worth per price, each as
  much as the money buys.
- ``lava-filter``: the same LAVA worths used to drop the worse half of the sellers; the budget is spread
  uniformly over the other half.
- ``projektor``: Projektor (``mixture.projektor``) on the sellers' sample rows. Pilot "runs" are logistic
  regressions on mixtures of the sample rows (drawn with replacement by the mixture ratio) at two sizes
  N0 < N1, scored by their error rate on the buyer's eval set (the mean of a few seeded draws). Pilot
  mixtures: uniform, every seller-heavy one (60% on the seller, the rest even), and seeded Dirichlet(1) ones.
  The OT of a mixture to the eval set is labelled, as LAVA's: a half squared distance plus
  ``LavaConfig().label_weight`` (1) times the class label distances (the sellers' samples are small and
  noisy, and labels are what separates a noisy seller from a clean one). Stage 1 at both pilot sizes, stage 2 to N = the rows the budget buys at the uniform
  mixture, then ``choose_mixture`` minimises the projected error rate. The mixture becomes rows by the largest
  total T whose rounded shares ``min(round(p_i T), rows_i)`` fit the budget (``rows_for_mixture``): a seller
  capped at its rows leaves its share to the others in proportion to p.

``lava-cover`` (class-reweighted LAVA worths and histogram coverage) is in ``acquisition.coverage``; the
truth-aware upper bound of ``bench dam`` (``acquisition.oracle``) is not a strategy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import numpy as np

from mates_lab.acquisition.market import Market, MarketError, MarketView
from mates_lab.acquisition.score import cost, fit_predict, validate_purchase, within_budget
from mates_megatron.registry import Registry

Strategy = Callable[[MarketView, int], dict[str, int]]
STRATEGIES: Registry[Strategy] = Registry(
    "strategy", how_to_register="register your own with @register(name) from mates_lab.acquisition.strategies"
)
register = STRATEGIES.register
get_strategy = STRATEGIES.get


def run_strategy(name: str, market: Market | MarketView, seed: int = 0) -> dict[str, int]:
    """The strategy's purchase on the market's public view, checked (MarketError on a broken rule)."""
    view = market.view() if isinstance(market, Market) else market
    return validate_purchase(view, get_strategy(name)(view, seed))


def affordable(money: float, price: float) -> int:
    """Rows of ``price`` that ``money`` buys (floor, never a row too many through rounding)."""
    if money <= 0:
        return 0
    n = int(math.floor(money / price))
    while n > 0 and n * price > money:
        n -= 1
    return n


def greedy(view: MarketView, order: Sequence[str]) -> dict[str, int]:
    """Sellers in ``order``, each as many rows as the money left buys (capped at its rows)."""
    sellers = {s.name: s for s in view.sellers}
    out = dict.fromkeys(sellers, 0)
    left = view.budget
    for name in order:
        s = sellers[name]
        out[name] = min(s.rows, affordable(left, s.price))
        left = view.budget - cost(view, out)
    return out


@register("uniform")
def uniform(view: MarketView, seed: int) -> dict[str, int]:
    out = {s.name: 0 for s in view.sellers}
    active = list(view.sellers)
    while active:
        share = (view.budget - cost(view, out)) / len(active)
        bought = False
        for s in active:
            n = min(s.rows - out[s.name], affordable(share, s.price))
            out[s.name] += n
            bought |= n > 0
        active = [s for s in active if out[s.name] < s.rows]
        if not bought:
            break
    return out


@register("cheapest")
def cheapest(view: MarketView, seed: int) -> dict[str, int]:
    return greedy(view, [s.name for s in sorted(view.sellers, key=lambda s: (s.price, s.name))])


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread for the tiny transports here: on 2 busy cores, 2 threads made each solve ~30x
    slower (the threads spin waiting for each other); restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _lava_config(seed: int):
    from mates_megatron.ot import SinkhornConfig
    from mates_megatron.scorers.lava import LavaConfig

    c = LavaConfig()
    return c, SinkhornConfig(epsilon=c.epsilon, cost_scale=0.5, seed=seed)


def _samples(view: MarketView) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every seller's sample rows stacked, their labels, and each row's seller index."""
    x = np.concatenate([s.sample_features for s in view.sellers]).astype(np.float32)  # a writable copy
    y = np.concatenate([s.sample_labels for s in view.sellers]).astype(np.int64)
    owner = np.concatenate([np.full(len(s.sample_labels), i) for i, s in enumerate(view.sellers)])
    return x, y, owner


def lava_worth(view: MarketView, seed: int) -> np.ndarray:
    """Each seller's worth (higher = better) from the labelled LAVA values of its sample rows."""
    from mates_megatron.ot.valuation import lava_values

    x, y, owner = _samples(view)
    c, cfg = _lava_config(seed)
    with one_thread():
        values, _, _ = lava_values(
            x, np.array(view.eval_features, dtype=np.float32), cfg, x_labels=y,
            y_labels=np.array(view.eval_labels, dtype=np.int64),
            label_weight=c.label_weight, label_epsilon=c.label_epsilon,
        )  # fmt: skip
    v = np.array([values[owner == i].mean() for i in range(len(view.sellers))])
    return v.max() - v + 0.01 * (v.max() - v.min()) + 1e-12


def _nothing_affordable(view: MarketView) -> bool:
    return all(affordable(view.budget, s.price) == 0 for s in view.sellers)


@register("lava")
def lava(view: MarketView, seed: int) -> dict[str, int]:
    if _nothing_affordable(view):
        return {s.name: 0 for s in view.sellers}
    if sum(len(s.sample_labels) for s in view.sellers) < 2:
        return uniform(view, seed)  # LAVA needs two candidates
    worth = lava_worth(view, seed)
    rank = sorted(
        range(len(view.sellers)), key=lambda i: (-worth[i] / view.sellers[i].price, view.sellers[i].name)
    )
    return greedy(view, [view.sellers[i].name for i in rank])


@register("lava-filter")
def lava_filter(view: MarketView, seed: int) -> dict[str, int]:
    """LAVA as a filter, not a ranking: the half of the sellers whose samples LAVA values worst is dropped,
    the budget is spread uniformly over the rest (a model trained on few sources overfits their skew, so
    spreading keeps the class coverage that the greedy ``lava`` gives up)."""
    if _nothing_affordable(view) or sum(len(s.sample_labels) for s in view.sellers) < 2:
        return uniform(view, seed)
    worth = lava_worth(view, seed)
    keep = sorted(range(len(view.sellers)), key=lambda i: (-worth[i], view.sellers[i].name))
    kept = replace(view, sellers=tuple(view.sellers[i] for i in keep[: math.ceil(len(keep) / 2)]))
    return {s.name: 0 for s in view.sellers} | uniform(kept, seed)


# --- Projektor --------------------------------------------------------------------------------------------


def rows_for_mixture(view: MarketView, p: np.ndarray) -> dict[str, int]:
    """Row counts ``min(round(p_i T), rows_i)`` for the largest T whose cost fits the budget."""
    p = np.asarray(p, dtype=np.float64)
    prices = np.array([s.price for s in view.sellers])
    avail = np.array([s.rows for s in view.sellers])

    def counts(t: int) -> np.ndarray:
        return np.minimum(np.rint(p * t).astype(np.int64), avail)

    def fits(t: int) -> bool:
        return within_budget(math.fsum(counts(t) * prices), view.budget)

    # Counts never fall as T grows, so the cost is monotone: bisect. Past ``hi`` every seller with p > 0 is
    # capped and the cost no longer moves.
    live = p > 0
    hi = int(np.ceil((avail[live] / p[live]).max())) + 1 if live.any() else 0
    if fits(hi):
        lo = hi
    else:
        lo, top = 0, hi  # fits(lo), not fits(top)
        while top - lo > 1:
            mid = (lo + top) // 2
            lo, top = (mid, top) if fits(mid) else (lo, mid)
    out = {s.name: int(n) for s, n in zip(view.sellers, counts(lo), strict=True)}
    if not within_budget(cost(view, out), view.budget):  # the strict check: fits() used the same rule
        raise MarketError("rows_for_mixture overspent: a bug")
    return out


def pilot_error(view: MarketView, p: np.ndarray, size: int, rng: np.random.Generator) -> float:
    """Error rate on the buyer's eval set of a logistic regression on ``size`` sample rows drawn (with
    replacement) from the sellers' samples by the mixture ``p``."""
    who = rng.choice(len(p), size=size, p=p / p.sum())
    xs, ys = [], []
    for i, s in enumerate(view.sellers):
        k = int((who == i).sum())
        if k:
            idx = rng.integers(0, len(s.sample_labels), size=k)
            xs.append(s.sample_features[idx])
            ys.append(s.sample_labels[idx])
    pred = fit_predict(np.concatenate(xs), np.concatenate(ys), view.eval_features)
    return float(np.mean(pred != view.eval_labels))


def projektor_mixture(
    view: MarketView,
    seed: int,
    *,
    pilot_sizes: tuple[int, int] = (20, 80),
    draws: int = 5,
    extra: int | None = None,
    ridge: float = 1e-3,
    steps: int = 100,
) -> tuple[np.ndarray, dict]:
    """Projektor's mixture over the sellers and what it was fitted on (see the module docstring)."""
    from mates_megatron.mixture.projektor import (
        choose_mixture,
        fit_stage1,
        mixture_ot,
        pilot_simplex,
        projected,
    )
    from mates_megatron.ot import SinkhornConfig
    from mates_megatron.ot.valuation import label_distances

    m = len(view.sellers)
    n0, n1 = pilot_sizes
    # Uniform, every seller-heavy mixture (60% on it, the rest even over the others),
    # then ``extra`` seeded Dirichlet(1) mixtures.
    ps = pilot_simplex(m, 1 + m + (m if extra is None else extra), seed, vertex_share=0.6)
    err = np.array([
        [np.mean([pilot_error(view, p, n, np.random.default_rng([seed, j, n, r, 0x9A7])) for r in range(draws)])
         for n in (n0, n1)]
        for j, p in enumerate(ps)
    ])  # fmt: skip
    c, _ = _lava_config(seed)
    x, y, _ = _samples(view)
    # Writable copies: torch warns on the view's read-only arrays.
    ex, ey = np.array(view.eval_features, dtype=np.float32), np.array(view.eval_labels, dtype=np.int64)
    w = label_distances(x, y, ex, ey, SinkhornConfig(epsilon=c.label_epsilon, cost_scale=0.5, seed=seed))
    # float64 and a tight tolerance: the gradient steps follow the OT value's small differences.
    cfg = SinkhornConfig(epsilon=0.1, cost_scale=0.5, max_iter=2000, tol=1e-4, dtype="float64", seed=seed)
    sources = [np.array(s.sample_features, dtype=np.float32) for s in view.sellers]
    kw = {"source_labels": [np.array(s.sample_labels, dtype=np.int64) for s in view.sellers],
          "target_labels": ey, "label_cost": c.label_weight * w}  # fmt: skip
    ots = np.array([mixture_ot(sources, p, ex, cfg, **kw)[0] for p in ps])
    fit0, fit1 = (fit_stage1(ots, ps, err[:, k], ridge=ridge) for k in range(2))
    n = max(1, sum(rows_for_mixture(view, np.full(m, 1.0 / m)).values()))
    proj = [projected(fit0, fit1, n0, n1, n).predict(o, p) for o, p in zip(ots, ps, strict=True)]
    p, value = choose_mixture(
        sources, ex, fit0, fit1, n0, n1, n, cfg, steps=steps,
        starts=[ps[int(np.argmin(proj))]], **kw,
    )  # fmt: skip
    return p, {"pilots": ps, "pilot_error": err, "ots": ots, "target_rows": n, "projected_error": value}


@register("projektor")
def projektor(view: MarketView, seed: int) -> dict[str, int]:
    if _nothing_affordable(view):
        return {s.name: 0 for s in view.sellers}
    if len(view.sellers) == 1 or any(len(s.sample_labels) == 0 for s in view.sellers):
        return uniform(view, seed)  # nothing to mix, or a seller with no sample to pilot on
    with one_thread():
        p, _ = projektor_mixture(view, seed)
    return rows_for_mixture(view, p)

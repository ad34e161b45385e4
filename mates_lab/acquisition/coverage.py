"""``lava-cover``: LAVA seller worths with the sellers' samples reweighted to the buyer's class shares, and
the purchase's class coverage from the sellers' public histograms (issue 35).

Why: the plain ``lava`` worths hardly rank the sellers' hidden noise (docs/results/dam.md) because a skewed
seller's 10 sample rows move the transport by their class mix more than by their noise, and buying from few
sellers loses the class coverage that uniform spend keeps.

- ``reweighted_worth``: one labelled LAVA transport of all the sellers' sample rows to the buyer's eval set
  with ``reweight_to_reference_classes`` (each label's total mass is its share of the eval labels, so class
  counts are not shipped across labels); a seller's value is the mean of its rows' values per label, averaged
  with the buyer's class shares over the labels in its sample (``seller_values``), so a seller's class mix
  does not weigh its value; worth = ``max v - v`` plus 1% of the spread (as ``lava``).
- ``coverage``: ``sum_k min(p_k, q_k)`` of the purchase's expected class shares ``p`` (each seller's rows
  bought times its public label histogram shares) against the eval's class shares ``q``: 1 when the
  purchase's class mix is the buyer's.
- ``lava-cover``: over every set of at least half the sellers, the one with the highest
  ``mean quality x coverage`` of its uniform spend (quality = worth / max worth), spent like ``uniform``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np

from mates_lab.acquisition.market import MarketView
from mates_lab.acquisition.strategies import (
    _lava_config,
    _nothing_affordable,
    _samples,
    one_thread,
    register,
    uniform,
)


def class_shares(labels: np.ndarray, classes: int) -> np.ndarray:
    """Shares [classes] of each label in ``labels``."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=classes).astype(np.float64)
    return counts / counts.sum()


def seller_values(
    values: np.ndarray, labels: np.ndarray, owner: np.ndarray, q: np.ndarray, m: int
) -> np.ndarray:
    """Each of the ``m`` sellers' value: ``sum_k q_k mean(values of its rows labelled k) / sum_k q_k`` over the
    labels k in its rows with ``q_k > 0``; a seller whose rows hold only labels the buyer lacks gets the
    largest row value (the most harmful)."""
    out = np.empty(m)
    for i in range(m):
        mine = owner == i
        ks = [int(k) for k in np.unique(labels[mine]) if q[int(k)] > 0]
        if not ks:
            out[i] = float(values.max())
            continue
        w = np.array([q[k] for k in ks])
        out[i] = float(np.dot(w, [values[mine & (labels == k)].mean() for k in ks]) / w.sum())
    return out


def reweighted_worth(view: MarketView, seed: int) -> np.ndarray:
    """Each seller's worth (higher = better) from the class-reweighted LAVA values of its sample rows."""
    from mates_megatron.ot.valuation import lava_values

    x, y, owner = _samples(view)
    ey = np.array(view.eval_labels, dtype=np.int64)
    q = class_shares(ey, view.classes)
    # Rows of a label the buyer lacks have no reference class to take their mass: kept out of the transport,
    # valued as the worst row.
    known = q[y] > 0
    c, cfg = _lava_config(seed)
    values = np.zeros(len(y))
    if known.sum() >= 2:
        with one_thread():
            v, _, _ = lava_values(
                x[known], np.array(view.eval_features, dtype=np.float32), cfg, x_labels=y[known],
                y_labels=ey, label_weight=c.label_weight, label_epsilon=c.label_epsilon,
                reweight_to_reference_classes=True,
            )  # fmt: skip
        values[known] = v
        values[~known] = v.max()
    v = seller_values(values, y, owner, q, len(view.sellers))
    return v.max() - v + 0.01 * (v.max() - v.min()) + 1e-12


def coverage(purchase: dict[str, int], view: MarketView) -> float:
    """``sum_k min(p_k, q_k)``: the purchase's expected class shares (public histograms) against the eval's."""
    q = class_shares(view.eval_labels, view.classes)
    p = np.zeros(view.classes)
    for s in view.sellers:
        hist = np.asarray(s.summary["label_histogram"], dtype=np.float64)
        if purchase.get(s.name, 0) and hist.sum() > 0:
            p += purchase[s.name] * hist / hist.sum()
    if p.sum() == 0:
        return 0.0
    return float(np.minimum(p / p.sum(), q).sum())


MAX_EXHAUSTIVE = 12
"""Sellers up to which ``choose_sellers`` tries every set of at least half of them."""


def choose_sellers(view: MarketView, worth: np.ndarray) -> tuple[int, ...]:
    """The set (of at least half the sellers) with the highest mean quality x coverage of its uniform spend;
    ties to the larger set, then the earlier sellers. Over ``MAX_EXHAUSTIVE`` sellers only the prefixes of
    the sellers by decreasing worth are tried (the subsets would be too many)."""
    m = len(view.sellers)
    quality = worth / worth.max()
    if m <= MAX_EXHAUSTIVE:
        sets = (k for n in range(math.ceil(m / 2), m + 1) for k in itertools.combinations(range(m), n))
    else:
        rank = sorted(range(m), key=lambda i: (-worth[i], i))
        sets = (tuple(sorted(rank[:n])) for n in range(math.ceil(m / 2), m + 1))
    best, best_key = tuple(range(m)), None
    for kept in sets:
        sub = replace(view, sellers=tuple(view.sellers[i] for i in kept))
        key = (float(quality[list(kept)].mean()) * coverage(uniform(sub, 0), view), len(kept))
        if best_key is None or key > best_key:
            best, best_key = kept, key
    return best


@register("lava-cover")
def lava_cover(view: MarketView, seed: int) -> dict[str, int]:
    if _nothing_affordable(view) or sum(len(s.sample_labels) for s in view.sellers) < 2:
        return uniform(view, seed)
    kept = choose_sellers(view, reweighted_worth(view, seed))
    sub = replace(view, sellers=tuple(view.sellers[i] for i in kept))
    return {s.name: 0 for s in view.sellers} | uniform(sub, seed)

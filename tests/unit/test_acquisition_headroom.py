"""The DAM headroom (issue 35): the truth-aware oracle within the budget and only from the sellers below its
noise threshold, the class-reweighted seller values and the histogram coverage against hand computations,
``lava-cover``'s choice of sellers on a hand-made case, and the headroom-share arithmetic."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.stats import t as student_t
from sklearn.datasets import make_classification

from mates_lab.acquisition import build_market, cost, coverage, oracle_purchase, reweighted_worth
from mates_lab.acquisition.coverage import choose_sellers, seller_values
from mates_lab.acquisition.market import MarketView, SellerView
from mates_lab.acquisition.strategies import uniform
from mates_lab.bench.dam import headroom_share


def pool(n: int = 1200, classes: int = 4, seed: int = 0):
    x, y = make_classification(
        n_samples=n, n_features=12, n_informative=6, n_classes=classes, n_clusters_per_class=1,
        class_sep=2.0, random_state=seed,
    )  # fmt: skip
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y, y


@pytest.mark.parametrize("threshold", [0.05, 0.1, 0.2, 0.3])
def test_oracle_obeys_the_budget_and_buys_only_below_the_threshold(threshold):
    x, y, g = pool()
    for seed in range(4):
        m = build_market(x, y, g, seed=seed, rows=(20, 60), eval_per_class=5, test_per_class=20)
        p = oracle_purchase(m, threshold, seed)
        assert set(p) == set(m.names())
        assert cost(m, p) <= m.budget * (1 + 1e-9) + 1e-9
        clean = [s for s in m.sellers if s.truth["noise_rate"] < threshold]
        assert clean  # the builder's noise rates start at 0
        for s in m.sellers:
            assert 0 <= p[s.name] <= s.rows
            if s.truth["noise_rate"] >= threshold:
                assert p[s.name] == 0
        # Over the clean sellers, exactly uniform's spend.
        v = m.view()
        kept = dataclasses.replace(
            v, sellers=tuple(sv for sv in v.sellers if sv.name in {s.name for s in clean})
        )
        assert {s.name: p[s.name] for s in clean} == uniform(kept, seed)


def test_oracle_without_a_clean_seller_buys_from_the_cleanest_and_rejects_a_bad_threshold():
    x, y, g = pool()
    m = build_market(x, y, g, seed=1, sellers=4, rows=(20, 60), eval_per_class=5, test_per_class=20)
    rates = [0.5, 0.3, 0.7, 0.3]
    m.sellers = [
        dataclasses.replace(s, truth={**s.truth, "noise_rate": r})
        for s, r in zip(m.sellers, rates, strict=True)
    ]
    p = oracle_purchase(m, 0.1)
    assert p[m.sellers[0].name] == p[m.sellers[2].name] == 0
    assert p[m.sellers[1].name] > 0 and p[m.sellers[3].name] > 0
    with pytest.raises(ValueError, match="threshold=0.0 must be > 0"):
        oracle_purchase(m, 0.0)


# --- the class-reweighted valuation -------------------------------------------------------------------------


def seller(name: str, labels, *, price: float = 1.0, rows: int = 10, hist=None, dim: int = 2) -> SellerView:
    labels = np.asarray(labels, dtype=np.int64)
    feats = np.random.default_rng(len(name)).normal(size=(len(labels), dim)).astype(np.float32)
    hist = hist if hist is not None else np.bincount(labels, minlength=2).tolist()
    return SellerView(name, price, rows, {"label_histogram": hist}, feats, labels)


def test_seller_values_weigh_labels_by_the_buyer_shares():
    # Seller 0: labels 0,0,0,1 with values 1,2,3,10; seller 1: labels 1,1 with values 4,6; buyer shares .4/.6.
    values = np.array([1.0, 2.0, 3.0, 10.0, 4.0, 6.0])
    labels = np.array([0, 0, 0, 1, 1, 1])
    owner = np.array([0, 0, 0, 0, 1, 1])
    q = np.array([0.4, 0.6])
    v = seller_values(values, labels, owner, q, 2)
    # By hand: seller 0 = (0.4 * mean(1,2,3) + 0.6 * 10) / 1 = 6.8 (unweighted mean: 4.0);
    # seller 1 = 0.6 * mean(4,6) / 0.6 = 5.
    assert v == pytest.approx([6.8, 5.0], abs=1e-12)
    # A label the buyer lacks (q = 0) is left out of the seller's average.
    assert seller_values(values, labels, owner, np.array([1.0, 0.0]), 2)[0] == pytest.approx(2.0)
    # Only such labels: the seller is the worst row.
    assert seller_values(values, labels, owner, np.array([1.0, 0.0]), 2)[1] == pytest.approx(10.0)


def test_reweighted_worth_transports_reweighted_masses_and_is_the_hand_value(monkeypatch):
    import mates_megatron.ot.valuation as valuation

    seen = {}

    def fake(x, y, cfg, **kw):
        seen.update(kw, n=len(x))
        return np.array([1.0, 2.0, 3.0, 10.0, 4.0, 6.0]), None, None

    monkeypatch.setattr(valuation, "lava_values", fake)
    view = MarketView(
        sellers=(seller("a", [0, 0, 0, 1]), seller("bb", [1, 1])),
        eval_features=np.zeros((5, 2), dtype=np.float32),
        eval_labels=np.array([0, 0, 1, 1, 1]),
        budget=5.0,
        classes=2,
    )
    w = reweighted_worth(view, 0)
    assert seen["reweight_to_reference_classes"] is True and seen["n"] == 6
    assert seen["x_labels"].tolist() == [0, 0, 0, 1, 1, 1]
    # Seller values 6.8 and 5 (above); worth = max - v + 1% of the spread (1.8).
    assert w == pytest.approx([0.018, 1.818], abs=1e-9)


def test_reweighted_worth_ranks_a_label_flipping_seller_last():
    # Two clean sellers, one whose every label is shifted by one class (skewed samples, so the reweighting acts).
    x, y, g = pool(600, classes=3, seed=4)
    rng = np.random.default_rng(0)
    free = [rng.permutation(np.flatnonzero(y == k)) for k in range(3)]
    ev = np.concatenate([f[:6] for f in free])
    counts = [(4, 2, 2), (2, 4, 2), (2, 2, 4)]
    rows = [
        np.concatenate([free[k][6 + 4 * i : 6 + 4 * i + c[k]] for k in range(3)])
        for i, c in enumerate(counts)
    ]

    def sv(name, r, labels):
        return SellerView(name, 1.0, 10, {"label_histogram": [4, 4, 4]}, x[r], labels)

    view = MarketView(
        sellers=(sv("clean0", rows[0], y[rows[0]]), sv("flip", rows[1], (y[rows[1]] + 1) % 3),
                 sv("clean2", rows[2], y[rows[2]])),
        eval_features=x[ev], eval_labels=y[ev], budget=10.0, classes=3,
    )  # fmt: skip
    w = reweighted_worth(view, 0)
    assert w[1] < min(w[0], w[2])


def test_coverage_is_the_histogram_overlap_by_hand():
    view = MarketView(
        sellers=(seller("a", [0], hist=[9, 1]), seller("b", [1], hist=[0, 4])),
        eval_features=np.zeros((4, 2), dtype=np.float32),
        eval_labels=np.array([0, 1, 1, 1]),
        budget=1.0,
        classes=2,
    )
    # 10 rows of a: 9 of class 0, 1 of class 1; 10 rows of b: 10 of class 1 -> p = (0.45, 0.55), q = (.25, .75)
    assert coverage({"a": 10, "b": 10}, view) == pytest.approx(0.25 + 0.55, abs=1e-12)
    assert coverage({"a": 10}, view) == pytest.approx(0.25 + 0.1, abs=1e-12)
    assert coverage({"b": 3, "a": 0}, view) == pytest.approx(0.75, abs=1e-12)
    assert coverage({}, view) == 0.0


def test_choose_sellers_trades_worth_against_coverage():
    # Sellers 0, 1 hold class 0 only, 2, 3 class 1 only; equal prices and rows; the buyer's classes are even.
    sellers = tuple(
        seller(f"s{i}", [k], hist=[10, 0] if k == 0 else [0, 10]) for i, k in enumerate([0, 0, 1, 1])
    )
    view = MarketView(sellers, np.zeros((2, 2), dtype=np.float32), np.array([0, 1]), budget=8.0, classes=2)
    # All worth the same: every set of >= 2 covering both classes scores 1; the largest wins the tie.
    assert choose_sellers(view, np.ones(4)) == (0, 1, 2, 3)
    # Seller 3 worth a tenth: {0, 2} and {1, 2} score 1 x 1 (the first wins); {0, 1, 2} 1 x 5/6;
    # everything 0.775 x 1; {0, 1} 1 x 0.5.
    assert choose_sellers(view, np.array([1.0, 1.0, 1.0, 0.1])) == (0, 2)


# --- the headroom share -----------------------------------------------------------------------------------


def test_headroom_share_arithmetic():
    s, u, o = [0.7, 0.6, 0.5, 0.64], [0.6, 0.6, 0.5, 0.6], [0.8, 0.7, 0.5, 0.68]
    h = headroom_share(s, u, o)
    # Per market (s - u) / (o - u): 0.1/0.2, 0/0.1, no headroom, 0.04/0.08.
    assert h["per_market"][0] == pytest.approx(0.5) and h["per_market"][1] == pytest.approx(0.0)
    assert h["per_market"][2] is None and h["per_market"][3] == pytest.approx(0.5)
    assert h["markets_without_headroom"] == 1
    shares = np.array([0.5, 0.0, 0.5])
    half = student_t.ppf(0.975, 2) * shares.std(ddof=1) / np.sqrt(3)
    assert h["mean"]["mean"] == pytest.approx(1 / 3)
    assert h["mean"]["ci95"] == pytest.approx([1 / 3 - half, 1 / 3 + half])
    # Ratio of means: mean(s - u) = 0.14 / 4 over mean(o - u) = 0.38 / 4.
    assert h["ratio_of_means"] == pytest.approx(0.14 / 0.38)
    # No headroom anywhere: no share at all.
    none = headroom_share([0.5], [0.6], [0.6])
    assert none["mean"] is None and none["ratio_of_means"] is None and none["per_market"] == [None]
    with pytest.raises(ValueError, match="equal non-empty"):
        headroom_share([0.5], [0.6, 0.7], [0.6])

"""The DataPerf DAM benchmark (``mates_lab.acquisition``): the scorer against hand-computed cases, markets
deterministic by seed and round-tripped through their files, every strategy within the budget and the
sellers' rows, strategies confined to the public view, and the errors on bad purchases and bad files."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from sklearn.datasets import make_classification

from mates_lab.acquisition import (
    STRATEGIES,
    Market,
    MarketError,
    MarketView,
    Seller,
    build_market,
    cost,
    load_market,
    rows_for_mixture,
    run_strategy,
    save_market,
    score,
    validate_purchase,
)
from mates_lab.acquisition.market import summarize
from mates_lab.acquisition.strategies import affordable


def pool(n: int = 1500, classes: int = 5, seed: int = 0):
    x, y = make_classification(
        n_samples=n, n_features=16, n_informative=8, n_classes=classes, n_clusters_per_class=1,
        class_sep=2.0, random_state=seed,
    )  # fmt: skip
    groups = np.random.default_rng(seed).integers(0, 3, n)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y, groups


@pytest.fixture(scope="module")
def market():
    x, y, g = pool()
    return build_market(x, y, g, seed=3, rows=(30, 90), test_per_class=40)


def tiny_market() -> Market:
    """1-D, perfectly separable: seller 'a' holds class 0 at x < 0, 'b' class 1 at x > 0."""

    def seller(name, xs, label, price):
        f = np.array(xs, dtype=np.float32)[:, None]
        lab = np.full(len(xs), label, dtype=np.int64)
        return Seller(name, price, f, lab, np.arange(2, dtype=np.int64), summarize(f, lab, 2))

    return Market(
        sellers=[seller("a", [-1.0, -1.5, -2.0], 0, 1.5), seller("b", [1.0, 1.5, 2.0], 1, 2.25)],
        eval_features=np.array([[-1.0], [1.0], [2.0]], dtype=np.float32),
        eval_labels=np.array([0, 1, 1]),
        test_features=np.array([[-3.0], [-2.5], [-4.0], [3.0]], dtype=np.float32),
        test_labels=np.array([0, 0, 0, 1]),
        budget=12.0,
        classes=2,
        seed=0,
    )


# --- the scorer -------------------------------------------------------------------------------------------


def test_score_separable_purchase_is_exact():
    m = tiny_market()
    r = score(m, {"a": 3, "b": 3}, draws=3)
    assert r["accuracies"] == [1.0, 1.0, 1.0] and r["accuracy"] == 1.0
    assert r["cost"] == 3 * 1.5 + 3 * 2.25 == 11.25
    assert r["dam_score"] == pytest.approx(0.98 * 1.0 + 0.02 * (12 - 11.25) / 12, abs=1e-15)
    assert r["dam_score"] == pytest.approx(0.98125, abs=1e-12)
    # Any draw of 2 rows of a and 1 of b holds both classes: still exact.
    r = score(m, {"a": 2, "b": 1}, draws=4, seed=7)
    assert r["accuracy"] == 1.0 and r["cost"] == 5.25
    assert r["dam_score"] == pytest.approx(0.98 + 0.02 * 6.75 / 12, abs=1e-12)


def test_score_one_class_predicts_it_and_empty_predicts_eval_majority():
    m = tiny_market()
    r = score(m, {"a": 2})  # class 0 only: 3 of the 4 test rows
    assert r["accuracy"] == 0.75 and r["cost"] == 3.0
    assert r["dam_score"] == pytest.approx(0.98 * 0.75 + 0.02 * 9 / 12, abs=1e-12)  # 0.75
    r = score(m, {})  # the eval set's majority is class 1: 1 of the 4 test rows, nothing spent
    assert r["accuracy"] == 0.25 and r["cost"] == 0.0 and r["rows"] == 0
    assert r["dam_score"] == pytest.approx(0.98 * 0.25 + 0.02, abs=1e-12)


def test_score_is_deterministic_by_seed_and_needs_the_full_market(market):
    p = run_strategy("uniform", market, 0)
    a, b = score(market, p, draws=3, seed=1), score(market, p, draws=3, seed=1)
    assert a == b
    assert len(a["accuracies"]) == 3 and 0.0 <= a["accuracy"] <= 1.0
    with pytest.raises(TypeError, match="full Market"):
        score(market.view(), p)


# --- purchases --------------------------------------------------------------------------------------------


def test_validate_purchase_messages():
    m = tiny_market()
    assert validate_purchase(m, {"b": 2}) == {"a": 0, "b": 2}
    assert validate_purchase(m.view(), {"a": np.int64(1)}) == {"a": 1, "b": 0}
    cases = [
        ({"c": 1}, "purchase names seller 'c', which this market does not have (sellers: a, b)"),
        ({"a": -1}, "purchase of -1 rows from seller 'a': the count must be >= 0"),
        ({"a": 1.5}, "purchase of 1.5 rows from seller 'a': the count must be a whole number (int)"),
        ({"a": True}, "purchase of True rows from seller 'a': the count must be a whole number (int)"),
        ({"b": 4}, "purchase of 4 rows from seller 'b': the seller has only 3 rows"),
        ({"a": 3, "b": 3, **{}}, None),
    ]
    for purchase, msg in cases:
        if msg is None:
            validate_purchase(m, purchase)
            continue
        with pytest.raises(MarketError, match=re.escape(msg)):
            validate_purchase(m, purchase)
    over = dataclasses.replace(m, budget=11.0)
    with pytest.raises(
        MarketError, match=re.escape("purchase costs 11.25, over the budget 11: buy fewer rows")
    ):
        validate_purchase(over, {"a": 3, "b": 3})
    # Exactly the budget is allowed, also where the float sum is a hair over it.
    tight = dataclasses.replace(m, budget=0.1 + 0.2, sellers=[dataclasses.replace(m.sellers[0], price=0.1)])
    assert cost(tight, {"a": 3}) >= 0.1 + 0.2 - 1e-15
    validate_purchase(tight, {"a": 3})


def test_affordable_never_rounds_up():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        price = float(np.round(rng.uniform(0.01, 5), 2))
        money = float(rng.uniform(0, 50))
        n = affordable(money, price)
        assert n * price <= money and (n + 1) * price > money - 1e-9


def random_market(rng: np.random.Generator, x, y, g) -> Market:
    m = build_market(
        x, y, g, seed=int(rng.integers(1 << 30)), sellers=int(rng.integers(1, 7)),
        rows=(int(rng.integers(1, 5)), int(rng.integers(5, 60))), prices=(0.01, float(rng.uniform(0.02, 7.3))),
        budget_share=(0.001, float(rng.uniform(0.002, 1.0))), eval_per_class=3, test_per_class=10,
        sample_rows=int(rng.integers(1, 6)),
    )  # fmt: skip
    # Prices that do not divide the budget, and budgets from below the cheapest row to above everything.
    sellers = [
        dataclasses.replace(s, price=float(rng.choice([0.37, 1.1, 2.9, 0.013, s.price]))) for s in m.sellers
    ]
    total = sum(s.price * s.rows for s in sellers)
    budget = float(rng.choice([0.005, rng.uniform(0, 1) * total, 1.3 * total, m.budget]))
    return dataclasses.replace(m, sellers=sellers, budget=max(budget, 1e-3))


def check_purchase(m: Market, purchase: dict[str, int]) -> None:
    assert set(purchase) == set(m.names())
    assert cost(m, purchase) <= m.budget * (1 + 1e-9) + 1e-9
    for s in m.sellers:
        assert isinstance(purchase[s.name], int) and 0 <= purchase[s.name] <= s.rows


def test_cheap_strategies_never_overspend_and_spend_what_their_rule_allows():
    x, y, g = pool(900, classes=3, seed=1)
    rng = np.random.default_rng(1)
    for _ in range(60):
        m = random_market(rng, x, y, g)
        for name in ("uniform", "cheapest"):
            p = run_strategy(name, m, 0)
            check_purchase(m, p)
            left = m.budget - cost(m, p)
            # Nothing a seller with rows left could still sell is affordable with the money left (cheapest);
            # uniform stops only when an equal split of the rest buys no row anywhere.
            open_ = [s for s in m.sellers if p[s.name] < s.rows]
            if name == "cheapest":
                assert all(s.price > left for s in open_)
            else:
                assert all(s.price > left / len(open_) for s in open_)


def test_rows_for_mixture_fits_the_budget_and_caps():
    x, y, g = pool(900, classes=3, seed=2)
    rng = np.random.default_rng(2)
    for _ in range(40):
        m = random_market(rng, x, y, g)
        v = m.view()
        p = rng.dirichlet(np.ones(len(v.sellers)))
        p[rng.random(len(p)) < 0.2] = 0.0
        if not p.sum():
            p[0] = 1.0
        p /= p.sum()
        out = rows_for_mixture(v, p)
        check_purchase(m, out)
        for s, pi in zip(m.sellers, p, strict=True):
            if pi == 0:
                assert out[s.name] == 0
    # A budget above everything buys every row of every seller the mixture names.
    m = dataclasses.replace(tiny_market(), budget=1e6)
    assert rows_for_mixture(m.view(), np.array([0.3, 0.7])) == {"a": 3, "b": 3}
    assert rows_for_mixture(m.view(), np.array([0.0, 1.0])) == {"a": 0, "b": 3}


@pytest.mark.parametrize("name", ["lava", "lava-filter", "lava-cover", "projektor"])
def test_ot_strategies_never_overspend_and_are_deterministic(name):
    x, y, g = pool(900, classes=3, seed=3)
    rng = np.random.default_rng(3)
    for k in range(2):
        m = random_market(rng, x, y, g)
        if k == 0:
            m = dataclasses.replace(m, budget=0.005)  # below every price: nothing to buy
        p = run_strategy(name, m, k)
        check_purchase(m, p)
        if k == 0:
            assert sum(p.values()) == 0
    m = build_market(x, y, g, seed=5, sellers=3, rows=(20, 60), eval_per_class=5, test_per_class=20)
    a, b = run_strategy(name, m, 1), run_strategy(name, m, 1)
    check_purchase(m, a)
    assert a == b and sum(a.values()) > 0
    if name == "lava-filter":  # the worse half (here 1 of 3) buys nothing
        assert sum(n > 0 for n in a.values()) <= 2
    if name == "lava-cover":  # at least half the sellers (here 2 of 3) buy
        assert sum(n > 0 for n in a.values()) >= 2


# --- markets ----------------------------------------------------------------------------------------------


def test_market_is_byte_identical_by_seed_and_round_trips(tmp_path):
    x, y, g = pool()
    kw = {"rows": (30, 90), "test_per_class": 40}
    a, b, c = (build_market(x, y, g, seed=s, **kw) for s in (11, 11, 12))
    for m, d in ((a, "a"), (b, "b"), (c, "c")):
        save_market(m, tmp_path / d)
    for f in ("market.json", "arrays.npz"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
        assert (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes()
    back = load_market(tmp_path / "a")
    assert back.budget == a.budget and back.classes == a.classes and back.seed == 11 and back.build == a.build
    for f in ("eval_features", "eval_labels", "test_features", "test_labels"):
        assert np.array_equal(getattr(back, f), getattr(a, f))
    for s, t in zip(back.sellers, a.sellers, strict=True):
        assert (s.name, s.price, s.summary, s.truth) == (t.name, t.price, t.summary, t.truth)
        for f in ("features", "labels", "sample"):
            assert np.array_equal(getattr(s, f), getattr(t, f)) and getattr(s, f).dtype == getattr(t, f).dtype
    save_market(back, tmp_path / "again")
    assert (tmp_path / "again" / "arrays.npz").read_bytes() == (tmp_path / "a" / "arrays.npz").read_bytes()


def test_market_rows_are_disjoint_and_sellers_differ(market):
    x, y, g = pool()
    key = {r.tobytes(): i for i, r in enumerate(x)}
    owners = [{key[r.tobytes()] for r in s.features} for s in market.sellers]
    owners += [
        {key[r.tobytes()] for r in market.eval_features},
        {key[r.tobytes()] for r in market.test_features},
    ]
    assert sum(map(len, owners)) == len(set().union(*owners))
    assert np.array_equal(np.bincount(market.eval_labels), np.full(5, 10))
    assert np.array_equal(np.bincount(market.test_labels), np.full(5, 40))
    noise = sorted(s.truth["noise_rate"] for s in market.sellers)
    assert noise[0] == 0.0 and noise[-1] > 0.35
    assert {s.truth["skew"] for s in market.sellers} == {"balanced", "mild", "strong"}
    total = sum(s.price * s.rows for s in market.sellers)
    assert 0.2 * total - 0.01 <= market.budget <= 0.4 * total
    for s in market.sellers:
        assert len(s.sample) == 10 and s.summary["rows"] == s.rows
        # A flipped label is always the seller's derangement of the true one (the noise is systematic).
        perm = s.truth["derangement"]
        assert all(perm[k] != k for k in range(5))


def test_strategies_see_only_the_public_view(market):
    view = market.view()
    assert {f.name for f in dataclasses.fields(MarketView)} == {
        "sellers", "eval_features", "eval_labels", "budget", "classes",
    }  # fmt: skip
    assert not hasattr(view, "test_features") and not hasattr(view, "test_labels")
    for sv, s in zip(view.sellers, market.sellers, strict=True):
        for hidden in ("features", "labels", "sample", "truth"):
            assert not hasattr(sv, hidden)
        assert np.array_equal(sv.sample_features, s.features[s.sample]) and sv.rows == s.rows
        assert not sv.sample_features.flags.writeable and not sv.sample_labels.flags.writeable
    assert not view.eval_features.flags.writeable
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.budget = 1e9
    seen = []
    STRATEGIES.register("_spy")(lambda v, seed: seen.append(v) or {})
    try:
        run_strategy("_spy", market, 0)
    finally:
        STRATEGIES.unregister("_spy")
    assert isinstance(seen[0], MarketView)


def test_load_market_errors_name_the_file(tmp_path, market):
    d = save_market(market, tmp_path / "m")
    with pytest.raises(MarketError, match=re.escape(str(tmp_path / "nope"))):
        load_market(tmp_path / "nope")
    good = (d / "market.json").read_text()
    (d / "market.json").write_text(good[:50])
    with pytest.raises(MarketError, match=re.escape(f"{d / 'market.json'}: not valid JSON")):
        load_market(d)
    meta = json.loads(good)
    del meta["budget"]
    (d / "market.json").write_text(json.dumps(meta))
    with pytest.raises(MarketError, match=re.escape(f"{d / 'market.json'}: no 'budget' entry")):
        load_market(d)
    meta = json.loads(good)
    meta["sellers"][1]["rows"] += 1
    (d / "market.json").write_text(json.dumps(meta))
    with pytest.raises(MarketError, match=re.escape(f"{d / 'arrays.npz'}: seller 'seller_01' has")):
        load_market(d)
    meta = json.loads(good)
    meta["sellers"][0]["price"] = -1
    (d / "market.json").write_text(json.dumps(meta))
    with pytest.raises(MarketError, match="seller 'seller_00' has price -1.0; a price per row must be > 0"):
        load_market(d)
    (d / "market.json").write_text(good)
    arrays = (d / "arrays.npz").read_bytes()
    (d / "arrays.npz").write_bytes(arrays[: len(arrays) // 2])
    with pytest.raises(MarketError, match=re.escape(f"{d / 'arrays.npz'}: cannot be read")):
        load_market(d)
    (d / "arrays.npz").unlink()
    with pytest.raises(MarketError, match=re.escape(f"{d / 'arrays.npz'}: missing")):
        load_market(d)
    (d / "market.json").unlink()
    with pytest.raises(MarketError, match=re.escape(f"{d / 'market.json'}: missing")):
        load_market(d)

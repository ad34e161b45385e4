"""The fresh-data cap: each domain's weight at most its unrepeated share (``weights.cap_unrepeated``), and
AutoScale's prediction capped with it; the lab's weight distances."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import minimize

from mates_megatron.mixture.autoscale import autoscale_weights
from mates_megatron.mixture.weights import (
    MixtureError,
    cap_unrepeated,
    constant,
    read_domain_tokens,
    read_weights,
    write_weights,
)


def test_cap_by_hand():
    # a may serve 30 of the 100 tokens: capped at 0.3; the other 0.7 goes to b and c as 3 : 2.
    w = cap_unrepeated({"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 30, "b": 100, "c": 100}, 100)
    assert w == pytest.approx({"a": 0.3, "b": 0.42, "c": 0.28})


def test_capping_one_domain_can_push_another_over_its_cap():
    # a capped at 0.4; the rest 0.6 as 3 : 1 gives b 0.45 > its cap 0.35, so b is capped too; c takes 0.25.
    w = cap_unrepeated({"a": 0.6, "b": 0.3, "c": 0.1}, {"a": 40, "b": 35, "c": 100}, 100)
    assert w == pytest.approx({"a": 0.4, "b": 0.35, "c": 0.25})


def test_a_cap_that_does_not_bind_changes_nothing_and_zero_stays_zero():
    w = cap_unrepeated({"a": 2, "b": 1, "c": 0}, {"a": 1e6, "b": 1e6, "c": 1e6}, 100)
    assert w == pytest.approx({"a": 2 / 3, "b": 1 / 3, "c": 0.0})
    w = cap_unrepeated({"a": 0.9, "b": 0.1, "c": 0}, {"a": 50, "b": 60, "c": 1e6}, 100)
    assert w == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.0})  # c has no weight: it takes no mass


def test_too_little_data_is_refused():
    with pytest.raises(MixtureError, match="without repeating"):
        cap_unrepeated({"a": 1, "b": 1, "c": 0}, {"a": 40, "b": 40, "c": 1e6}, 100)
    with pytest.raises(MixtureError, match="no available amount"):
        cap_unrepeated({"a": 1, "b": 1}, {"a": 40}, 100)


@pytest.mark.parametrize("seed", range(5))
def test_cap_is_the_closest_mixture_in_kl_that_repeats_nothing(seed):
    # Keeping the capped domains at their caps and scaling the rest by one factor is the KKT point of
    # min KL(v || w) s.t. sum v = 1, v <= cap: checked against scipy's SLSQP.
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.ones(6))
    avail = rng.uniform(0.05, 0.5, 6) * 100
    avail *= max(1.0, 1.2 / (avail.sum() / 100))
    got = cap_unrepeated(dict(enumerate(w)), dict(enumerate(avail)), 100)
    v = np.array([got[i] for i in range(6)])
    assert v.sum() == pytest.approx(1) and (v <= avail / 100 + 1e-12).all()

    def kl(x):
        x = np.maximum(x, 1e-15)
        return float(np.sum(x * np.log(x / w)))

    ref = minimize(kl, np.minimum(w, avail / 100), method="SLSQP",
                   bounds=[(1e-12, c) for c in avail / 100],
                   constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
                   options={"ftol": 1e-14, "maxiter": 1000})  # fmt: skip
    assert v == pytest.approx(ref.x, abs=1e-5)


def _ddo(path, steps, amounts, seq=4):
    return write_weights(path, constant(amounts, {
        "method": "ddo", "steps": steps, "budget_samples": steps * 8, "budget_tokens": steps * 8 * seq,
        "amounts_samples": amounts}))  # fmt: skip


def test_autoscale_capped_at_unrepeated_tokens(tmp_path):
    small = _ddo(tmp_path / "s.json", 10, {"a": 40.0, "b": 40.0})
    large = _ddo(tmp_path / "l.json", 20, {"a": 120.0, "b": 40.0})
    # Uncapped (test_ddo): a 600/640 at 80 steps. 80 steps x 8 samples x 4 tokens = 2560 tokens; a holds
    # 1280 of them (cap 0.5), b 5000: a 0.5, b 0.5.
    s = autoscale_weights(small, large, 80, available_tokens={"a": 1280, "b": 5000})
    assert s.at(0) == pytest.approx({"a": 0.5, "b": 0.5})
    assert s.source["uncapped_weights"] == pytest.approx({"a": 600 / 640, "b": 40 / 640})
    assert s.source["budget_tokens"] == 2560
    assert autoscale_weights(small, large, 80).at(0) == pytest.approx({"a": 600 / 640, "b": 40 / 640})


def test_cli_predict_caps_with_the_prepared_tokens(tmp_path):
    from mates_megatron.cli import main

    _ddo(tmp_path / "s.json", 10, {"a": 40.0, "b": 40.0})
    _ddo(tmp_path / "l.json", 20, {"a": 120.0, "b": 40.0})
    (tmp_path / "train.meta.json").write_text(json.dumps({"tokens_per_domain": {"a": 1280, "b": 5000}}))
    assert read_domain_tokens(tmp_path / "train") == {"a": 1280.0, "b": 5000.0}
    out = tmp_path / "auto.json"
    assert main(["mixture", "predict", "--small", str(tmp_path / "s.json"), "--large", str(tmp_path / "l.json"),
                 "--steps", "80", "--cap-unrepeated", str(tmp_path / "train"), "--out", str(out)]) == 0  # fmt: skip
    assert read_weights(out).at(0) == pytest.approx({"a": 0.5, "b": 0.5})
    assert main(["mixture", "predict", "--small", str(tmp_path / "s.json"), "--large", str(tmp_path / "l.json"),
                 "--steps", "80", "--cap-unrepeated", str(tmp_path / "none"), "--out", str(out)]) == 2  # fmt: skip


def test_weight_distances_and_seed_spread():
    from mates_lab.bench.autoscale_seeds import seed_spread, weight_distance

    a, b, c = {"x": 0.5, "y": 0.5}, {"x": 0.2, "y": 0.8}, {"x": 0.4, "y": 0.6}
    assert weight_distance(a, b) == pytest.approx({"l1": 0.6, "linf": 0.3})
    s = seed_spread({0: a, 1: b, 2: c})
    assert s["pairs"]["0-1"] == pytest.approx({"l1": 0.6, "linf": 0.3})
    assert s["mean_linf"] == pytest.approx((0.3 + 0.1 + 0.2) / 3)
    assert s["mean_l1"] == pytest.approx((0.6 + 0.2 + 0.4) / 3)

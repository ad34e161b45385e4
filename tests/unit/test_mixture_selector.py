"""The mixture selector: served shares follow the weights, per-domain streams never repeat an id, a domain
running short is redistributed (or stops the run), and a resume across a weight change draws the same rounds."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest

from mates_megatron.config import SelectionConfig
from mates_megatron.mixture.weights import MixtureError, read_weights
from mates_megatron.pool.base import PoolError
from mates_megatron.selectors.mixture import MixtureSelector, quotas

DOMAINS = ["a", "b", "c", "d"]
SIZES = [3000, 1000, 500, 200]


def _domain_of(seed=0):
    dom = np.repeat(np.arange(4), SIZES)
    return np.random.default_rng(seed).permutation(dom)  # ids of a domain spread over the pool


def _weights(path, *entries):
    path.write_text(json.dumps({"schedule": [{"from_round": r, "weights": w} for r, w in entries]}))
    return str(path)


def _selector(path, **kw):
    return MixtureSelector(DOMAINS, _domain_of(), str(path), seed=5, **kw)


def test_quotas_sum_to_k_and_stay_within_one_of_the_exact_share():
    assert quotas(10, np.array([0.5, 0.3, 0.2])).tolist() == [5, 3, 2]
    # 7 * (1/3, 1/3, 1/3) = 2.33 each: one extra goes to the first (ties to the lower index)
    assert quotas(7, np.ones(3)).tolist() == [3, 2, 2]
    assert quotas(10, np.array([0.0, 0.26, 0.74])).tolist() == [0, 3, 7]
    rng = np.random.default_rng(0)
    for _ in range(100):
        w = rng.random(6)
        k = int(rng.integers(1, 500))
        q = quotas(k, w)
        assert q.sum() == k and np.all(np.abs(q - k * w / w.sum()) < 1)


def test_served_shares_follow_the_weights_and_no_id_repeats(tmp_path):
    w = {"a": 0.1, "b": 0.4, "c": 0.3, "d": 0.2}
    sel = _selector(_weights(tmp_path / "w.json", (0, w)))
    dom = _domain_of()
    seen = []
    k = 64
    for r in range(10):
        ids = sel.select(np.arange(k), k, seed=5, round_=r)
        assert len(ids) == k and np.all(np.diff(ids) > 0)
        share = np.bincount(dom[ids], minlength=4) / k
        # Quotas are largest remainders: each share is within 1/k of its weight, every round.
        assert np.all(np.abs(share - [w[d] for d in DOMAINS]) < 1 / k + 1e-12)
        seen.append(ids)
    everything = np.concatenate(seen)
    assert len(np.unique(everything)) == len(everything)
    assert sel.consumed.tolist() == np.bincount(dom[everything], minlength=4).tolist()
    # Each domain's stream is a seeded permutation of its ids: another seed reads them in another order.
    other = MixtureSelector(DOMAINS, dom, sel.weights_path, seed=6)
    assert not np.array_equal(other.select(np.arange(k), k, seed=6, round_=0), seen[0])


def test_a_short_domain_gives_what_it_has_and_the_rest_goes_by_weight(tmp_path, caplog):
    # d has 200 ids; at 0.5 of 200 per round it runs short in round 1 (100 + 100 = 200, then 0 left).
    path = _weights(tmp_path / "w.json", (0, {"a": 0.25, "b": 0.125, "c": 0.125, "d": 0.5}))
    sel = _selector(path)
    dom = _domain_of()
    for r in range(2):
        sel.select(np.arange(200), 200, seed=5, round_=r)
    with caplog.at_level(logging.WARNING, logger="mates_megatron.mixture"):
        ids = sel.select(np.arange(200), 200, seed=5, round_=2)
    counts = np.bincount(dom[ids], minlength=4)
    # d's 100 go to a, b, c by their weights 2:1:1 -> 50, 25, 25 extra.
    assert counts.tolist() == [100, 50, 50, 0]
    assert sel.history[2]["short"] == {"d": 100}
    assert "mixture round 2: d by 100 ran short" in caplog.text and "a +50" in caplog.text
    strict = _selector(path, when_short="error")
    for r in range(2):
        strict.select(np.arange(200), 200, seed=5, round_=r)
    with pytest.raises(
        PoolError, match=r"mixture round 2: domain\(s\) \{'d': 100\} have run out of candidates"
    ):
        strict.select(np.arange(200), 200, seed=5, round_=2)


def test_an_exhausted_pool_stops_with_the_round_named(tmp_path):
    sel = _selector(_weights(tmp_path / "w.json", (0, {"a": 1, "b": 1, "c": 1, "d": 1})))
    for r in range(2):
        sel.select(np.arange(2000), 2000, seed=5, round_=r)
    with pytest.raises(PoolError, match=r"mixture round 2: .*no domain has data left"):
        sel.select(np.arange(2000), 2000, seed=5, round_=2)


def test_resume_across_a_weight_change_draws_the_uninterrupted_rounds(tmp_path):
    first = {"a": 0.7, "b": 0.1, "c": 0.1, "d": 0.1}
    second = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}
    path = tmp_path / "w.json"
    _weights(path, (0, first), (4, second))
    full = _selector(path)
    expected = [full.select(np.arange(50), 50, seed=5, round_=r) for r in range(8)]
    dom = _domain_of()
    assert np.bincount(dom[expected[3]], minlength=4).tolist() == [35, 5, 5, 5]
    assert np.bincount(dom[expected[4]], minlength=4).tolist() == [5, 10, 15, 20]

    # A run that starts with the first weights only; the change is appended to the file at a round
    # boundary (before round 4 is drawn), and the run is checkpointed after round 5 and resumed.
    _weights(path, (0, first))
    run = _selector(path)
    got = [run.select(np.arange(50), 50, seed=5, round_=r) for r in range(4)]
    _weights(path, (0, first), (4, second))
    got += [run.select(np.arange(50), 50, seed=5, round_=r) for r in (4, 5)]
    state = copy.deepcopy(run.state_dict())
    resumed = _selector(path)
    resumed.select(np.arange(50), 50, seed=5, round_=0)  # what the hook draws at construction
    resumed.load_state_dict(state)
    got += [resumed.select(np.arange(50), 50, seed=5, round_=r) for r in (6, 7)]
    for a, b in zip(expected, got, strict=True):
        assert np.array_equal(a, b)
    with pytest.raises(RuntimeError, match="round 9 drawn after round 7"):
        resumed.select(np.arange(50), 50, seed=5, round_=9)
    with pytest.raises(ValueError, match="resume with the same pool and seed"):
        MixtureSelector(DOMAINS, dom, str(path), seed=6).load_state_dict(state)


def test_bad_weights_and_pools_are_named(tmp_path):
    path = tmp_path / "w.json"
    _weights(path, (0, {"a": 1, "b": 1, "c": 1}))
    with pytest.raises(MixtureError, match=r"name domains \['a', 'b', 'c'\].*missing \['d'\]"):
        _selector(path)
    _weights(path, (0, {"a": 1, "b": float("nan"), "c": 1, "d": 1}))
    with pytest.raises(MixtureError, match="weights must be finite and >= 0"):
        read_weights(path)
    _weights(path, (2, {"a": 1, "b": 1, "c": 1, "d": 1}))
    with pytest.raises(MixtureError, match="the first schedule entry must start at round 0"):
        read_weights(path)
    _weights(path, (0, {"a": 0, "b": 0, "c": 0, "d": 0}))
    with pytest.raises(MixtureError, match="the weights sum to 0"):
        read_weights(path)
    with pytest.raises(MixtureError, match="no such file"):
        read_weights(tmp_path / "missing.json")
    _weights(path, (0, {"a": 1, "b": 1, "c": 1, "d": 1}))
    dom = _domain_of()
    dom[7] = -1
    with pytest.raises(PoolError, match="needs every candidate's domain, and 1 of 4700 have none"):
        MixtureSelector(DOMAINS, dom, str(path), seed=0)
    with pytest.raises(ValueError, match="selector 'mixture' serves domain weights from a file: set Mixture"):
        SelectionConfig(selector="mixture")
    with pytest.raises(ValueError, match=r"'random' takes no options, got \['weights'\]"):
        SelectionConfig(selector="random", selector_options={"weights": str(path)})

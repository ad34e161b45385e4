"""Selectors: Gumbel-top-k against its definition, top-k, random; determinism and bad scores."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from mates_megatron.selectors import SELECTORS, GumbelTopKSelector, RandomSelector, TopKSelector

CANDIDATES = np.arange(100, 130, dtype=np.int32)


def _scores(n=30, seed=0):
    return np.random.default_rng(seed).normal(size=n)


def test_zero_and_tiny_temperature_equal_exact_topk():
    s = _scores()
    exact = TopKSelector().select(CANDIDATES, 7, scores=s)
    assert exact.tolist() == sorted(CANDIDATES[np.argsort(s)[:7]].tolist())
    assert (
        GumbelTopKSelector(0.0).select(CANDIDATES, 7, scores=s, seed=1, round_=0).tolist() == exact.tolist()
    )
    for seed in range(20):
        got = GumbelTopKSelector(1e-6).select(CANDIDATES, 7, scores=s, seed=seed, round_=3)
        assert got.tolist() == exact.tolist()


def test_first_pick_frequencies_follow_softmax_of_minus_score():
    """k=1 Gumbel-top-k is a draw from softmax(-z / T): a chi-square test over many seeds."""
    scores = np.array([0.0, 0.3, 0.6, 1.0, 1.5, 2.0])
    cand = np.arange(6, dtype=np.int32)
    sel = GumbelTopKSelector(temperature=0.7, standardize=False)
    draws = 6000
    picks = np.array([sel.select(cand, 1, scores=scores, seed=s, round_=0)[0] for s in range(draws)])
    observed = np.bincount(picks, minlength=6)
    p = np.exp(-scores / 0.7)
    p /= p.sum()
    stat = chisquare(observed, p * draws)
    assert stat.pvalue > 0.01, (observed, p * draws)
    # Lower scores are picked more often (the noise is subtracted, not added).
    assert observed[0] > observed[-1] * 3


def test_standardized_temperature_is_scale_free():
    s = _scores()
    a = GumbelTopKSelector(0.5).select(CANDIDATES, 8, scores=s, seed=4, round_=2)
    b = GumbelTopKSelector(0.5).select(CANDIDATES, 8, scores=s * 1e-3 + 7.0, seed=4, round_=2)
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize("name", ["random", "topk", "gumbel"])
def test_deterministic_distinct_and_within_candidates(name):
    sel = SELECTORS.get(name)()
    s = _scores()
    runs = [sel.select(CANDIDATES, 10, scores=s, seed=3, round_=5) for _ in range(3)]  # as on 3 ranks
    assert all(r.tolist() == runs[0].tolist() for r in runs)
    assert len(set(runs[0].tolist())) == 10 and set(runs[0].tolist()) <= set(CANDIDATES.tolist())
    assert runs[0].dtype == np.int32


def test_rounds_and_seeds_change_random_draws():
    a = RandomSelector().select(CANDIDATES, 10, seed=3, round_=0)
    b = RandomSelector().select(CANDIDATES, 10, seed=3, round_=1)
    assert a.tolist() != b.tolist()


def test_bad_scores_and_sizes():
    s = _scores()
    s[4] = np.nan
    with pytest.raises(
        ValueError, match=r"1 candidate scores are NaN or infinite \(first at candidate id 104\)"
    ):
        GumbelTopKSelector().select(CANDIDATES, 3, scores=s, seed=0, round_=0)
    with pytest.raises(ValueError, match=r"cannot select k=31 of 30 candidates"):
        RandomSelector().select(CANDIDATES, 31, seed=0, round_=0)
    with pytest.raises(ValueError, match="needs one score per candidate"):
        TopKSelector().select(CANDIDATES, 3, scores=None)
    import mates_megatron.scorers  # noqa: F401  (registers the 'importance' selector of scorer 'dsir')

    with pytest.raises(
        ValueError,
        match="unknown selector 'best'; registered: cluster_greedy, gumbel, importance, mixture, random, topk",
    ):
        SELECTORS.get("best")


def test_selection_config_builds_the_configured_selector():
    from mates_megatron.config import SelectionConfig

    sel = SelectionConfig(
        selector="gumbel", selector_options={"temperature": 0.25}, scorer="mates", warmup_steps=50
    ).build_selector()
    assert isinstance(sel, GumbelTopKSelector) and sel.temperature == 0.25
    assert isinstance(SelectionConfig(selector="random").build_selector(), RandomSelector)
    assert SELECTORS.get("gumbel").needs_scores and not SELECTORS.get("random").needs_scores
    with pytest.raises(ValueError, match="temperature=-1.0 must be >= 0"):
        SelectionConfig(selector="gumbel", selector_options={"temperature": -1.0}, scorer="dsir")
    with pytest.raises(ValueError, match=r"'random' takes no options, got \['temperature'\]"):
        SelectionConfig(selector="random", selector_options={"temperature": 0.5})
    with pytest.raises(ValueError, match="selection_ratio=0 must be in"):
        SelectionConfig(selection_ratio=0)


def test_selection_config_pairs_selectors_with_scorers():
    from mates_megatron.config import SelectionConfig

    with pytest.raises(ValueError, match="selector 'topk' ranks candidates by score: set scorer"):
        SelectionConfig(selector="topk")
    with pytest.raises(
        ValueError, match="selector 'random' ignores scores, so scorer 'mates' would run for nothing"
    ):
        SelectionConfig(selector="random", scorer="mates", warmup_steps=50)
    with pytest.raises(ValueError, match="scorer 'mates' scores candidates with the trained model"):
        SelectionConfig(selector="gumbel", scorer="mates")
    with pytest.raises(ValueError, match="is now two settings: selector: gumbel"):
        SelectionConfig(selector="mates")
    with pytest.raises(ValueError, match="SelectionConfig.scorer='best': choose one of"):
        SelectionConfig(selector="topk", scorer="best")
    with pytest.raises(ValueError, match="probe_samples=9: the influence model needs at least 10"):
        SelectionConfig(
            selector="gumbel", scorer="mates", warmup_steps=50, scorer_options={"probe_samples": 9}
        )
    with pytest.raises(ValueError, match="cannot import 'no_such_module_here'"):
        SelectionConfig(imports=["no_such_module_here"])


def test_selection_config_refuses_leads_and_asynchronous_rounds_it_cannot_run():
    from mates_megatron.config import SelectionConfig

    mates = {"selector": "gumbel", "scorer": "mates", "select_every": 50, "warmup_steps": 100}
    assert SelectionConfig(**mates, probe_lead_steps=99, asynchronous=True).asynchronous
    with pytest.raises(ValueError, match="the first scored round starts at step 100, so its probes would "
                       "come before the first training step; use at most 99"):  # fmt: skip
        SelectionConfig(**mates, probe_lead_steps=100)
    with pytest.raises(ValueError, match="asynchronous needs probe_lead_steps >= 1"):
        SelectionConfig(**mates, asynchronous=True)
    with pytest.raises(ValueError, match="probe_lead_steps=5 prepares scored rounds ahead, but scorer is"):
        SelectionConfig(probe_lead_steps=5)
    with pytest.raises(ValueError, match="probe_lead_steps=-1 must be >= 0"):
        SelectionConfig(**mates, probe_lead_steps=-1)
    from mates_megatron.scorers.base import SCORERS, NoScorer

    if "stage_free" not in SCORERS:
        SCORERS.register("stage_free")(type("StageFree", (NoScorer,), {}))
    with pytest.raises(ValueError, match="scorer 'stage_free' has none: set asynchronous: false"):
        SelectionConfig(**{**mates, "scorer": "stage_free"}, probe_lead_steps=1, asynchronous=True)
    assert SelectionConfig(**{**mates, "scorer": "stage_free"}, probe_lead_steps=1).probe_lead_steps == 1


def test_poor_fit_guard_reason():
    from mates_megatron.scorers.mates import poor_fit

    assert poor_fit(0.5, 0.1) is None
    assert "Spearman 0.050 is below selection.scorer_options.min_influence_spearman=0.1" in poor_fit(
        0.05, 0.1
    )
    assert "Spearman nan" in poor_fit(float("nan"), 0.1)  # a constant prediction has no rank correlation
    assert poor_fit(float("nan"), -1) is None  # -1: the guard is off


def test_oracle_by_domain_against_numpy():
    from mates_megatron.scorers.mates import oracle_by_domain

    class Pool:
        domains = ["a", "b", "c"]

        def domain_ids(self, ids):
            return np.asarray(ids) % 3

    ids = np.arange(10)
    scores = np.linspace(-1.0, 1.0, 10)
    out = oracle_by_domain(Pool(), ids, scores)
    assert sorted(out) == ["a", "b", "c"]
    for d, name in enumerate("abc"):
        s = scores[ids % 3 == d]
        assert out[name]["n"] == len(s) and out[name]["mean"] == pytest.approx(s.mean())
        assert out[name]["se"] == pytest.approx(np.std(s, ddof=1) / np.sqrt(len(s)))


def test_fit_pairs_appends_earlier_rounds_probes_z_scored_within_their_round():
    from mates_megatron.scorers.mates import fit_pairs

    rng = np.random.default_rng(0)
    oracle = {
        r: {"ids": np.arange(100 * r, 100 * r + 4), "scores": rng.normal(3.0 * r, r, 4)} for r in (1, 2, 3)
    }
    cands, positions, scores = np.arange(1000, 1010), np.array([1, 4, 7]), np.array([0.5, -1.0, 2.0])
    # One round (the paper), or a first scored round: the round's own pairs, untouched.
    for rounds, oracle_ in ((1, oracle), (3, {})):
        ids, pos, fit, used = fit_pairs(oracle_, rounds, 4, cands, positions, scores)
        assert ids is cands and pos is positions and fit is scores and used == [4]
    ids, pos, fit, used = fit_pairs(oracle, 3, 4, cands, positions, scores)
    assert used == [2, 3, 4]  # the last two earlier scored rounds, oldest first
    assert ids.tolist() == cands.tolist() + list(range(200, 204)) + list(range(300, 304))
    assert pos.tolist() == [1, 4, 7, 10, 11, 12, 13, 14, 15, 16, 17]
    z = lambda x: (x - x.mean()) / x.std()  # noqa: E731
    expected = np.concatenate([z(scores), z(oracle[2]["scores"]), z(oracle[3]["scores"])])
    np.testing.assert_allclose(fit, expected, rtol=1e-12)
    # Later rounds are never fitted on (a resumed run's oracle may hold them), and constant scores stay finite.
    oracle[5] = {"ids": np.arange(4), "scores": np.ones(4)}
    oracle[3]["scores"] = np.ones(4)
    ids, pos, fit, used = fit_pairs(oracle, 9, 4, cands, positions, scores)
    assert used == [1, 2, 3, 4] and np.isfinite(fit).all() and (fit[-4:] == 0).all()


def test_influence_rounds_must_be_positive():
    from mates_megatron.config import SelectionConfig

    with pytest.raises(ValueError, match=r"influence_rounds=0 must be >= 1 \(1: this round's probes only"):
        SelectionConfig(
            scorer="mates", selector="gumbel", warmup_steps=50, scorer_options={"influence_rounds": 0}
        )

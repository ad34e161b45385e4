"""Influence model 'relational' (Group-MATES): the relational score of a rollout's members, and a fit that
recovers a known relational model from rollouts."""

from __future__ import annotations

import numpy as np
import pytest

from mates_megatron.influence.config import InfluenceConfig, RelationalConfig
from mates_megatron.influence.relational import (
    RelationalFit,
    center_positions,
    deconvolve,
    fit_relational,
    relational_predict,
    step_ladder,
    unit_rows,
)
from mates_megatron.influence.ridge import ridge_solve
from mates_megatron.selectors.group import relational_scores
from mates_megatron.stats import spearman

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the fits are thousands of small Adam steps


def _rollouts(seed: int, n: int = 300, d: int = 6):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, d)) * 2  # clustered, so members relate by more than noise
    return centers[rng.integers(0, 4, n)] + rng.normal(size=(n, d)) * 0.7


TRUE = RelationalFit(w=np.random.default_rng(9).normal(size=6), b=-0.3, alpha=1.5, temperature=0.8)


def test_a_rollouts_scores_are_the_selectors_relational_scores():
    feats = _rollouts(0, n=23)
    got = relational_predict(feats, TRUE, 10)
    own = feats @ TRUE.w + TRUE.b
    for lo in (0, 10, 20):  # rollouts of 10, 10 and 3
        want = relational_scores(
            own[lo : lo + 10], unit_rows(feats[lo : lo + 10]), alpha=1.5, temperature=0.8
        )
        np.testing.assert_allclose(got[lo : lo + 10], want, rtol=1e-12)


def test_the_fit_recovers_a_known_relational_model():
    """Targets from a known model (alpha 1.5, temperature 0.8) plus noise (sd 0.1 of about 1.3): measured, the
    fit gives alpha 1.48, temperature 0.80 and an out-of-fold Spearman of 0.9994; the individual ridge head
    read with alpha = temperature = 1 ranks fresh rollouts at 0.964, the fit at 0.9999."""
    feats = _rollouts(0)
    rng = np.random.default_rng(1)
    y = relational_predict(feats, TRUE, 10) + rng.normal(size=len(feats)) * 0.1
    fit, result = fit_relational(feats, y, RelationalConfig(), seed=0)
    assert fit.alpha == pytest.approx(1.5, abs=0.1) and fit.temperature == pytest.approx(0.8, abs=0.05)
    assert result.spearman > 0.99
    fresh = _rollouts(2)
    want = relational_predict(fresh, TRUE, 10)
    w, b = ridge_solve(feats, (y - y.mean()) / y.std(), 1.0)
    individual = spearman(relational_predict(fresh, RelationalFit(w, b, 1.0, 1.0), 10), want)
    assert spearman(relational_predict(fresh, fit, 10), want) > max(0.999, individual)
    again, _ = fit_relational(feats, y, RelationalConfig(), seed=0)  # deterministic
    assert np.array_equal(again.w, fit.w) and again.alpha == fit.alpha


def test_a_shift_by_rollout_position_is_centred_out_before_the_fit():
    """Each step of a rollout shares the run's optimizer state: add to the known model's targets a large part
    that depends only on the position (a decaying momentum term, 3x the samples' own spread). Raw, the fit is
    lost in it; centred per position, it recovers the model's ranking of fresh rollouts."""
    feats = _rollouts(0)
    rng = np.random.default_rng(1)
    shift = 4.0 * 0.9 ** np.arange(10)  # per position
    y = relational_predict(feats, TRUE, 10) + np.tile(shift, 30) + rng.normal(size=len(feats)) * 0.1
    np.testing.assert_allclose(
        center_positions([1.0, 5.0, 3.0, 7.0, 8.0], 2), [-3.0, -1.0, -1.0, 1.0, 4.0]
    )  # positions 0: 1, 3, 8 (mean 4); 1: 5, 7 (mean 6)
    fresh = _rollouts(2)
    want = relational_predict(fresh, TRUE, 10)
    centred, result = fit_relational(feats, y, RelationalConfig(center_positions=True), seed=0)
    raw, raw_result = fit_relational(feats, y, RelationalConfig(), seed=0)
    assert spearman(relational_predict(fresh, centred, 10), want) > 0.95
    assert spearman(relational_predict(fresh, raw, 10), want) < spearman(
        relational_predict(fresh, centred, 10), want
    )
    assert result.spearman > raw_result.spearman


def test_steps_carried_by_momentum_are_deconvolved_to_each_samples_own_change():
    """Targets as Adam's momentum makes them, to first order: each step's change is the decaying sum of every
    earlier sample's own change in its rollout, ``d_k = beta d_(k-1) + (1 - beta) s_k``, plus the round's old
    momentum, ``beta^(k+1) E0`` (5x the samples' spread). Deconvolved with the same beta, then centred per
    position, the fit recovers the known model's ranking of fresh rollouts; raw, it does not."""
    np.testing.assert_allclose(deconvolve([1.0, 2.0, 4.0, 8.0, 3.0], 3, 0.5), [1.0, 1.5, 3.0, 8.0, -1.0])
    feats = _rollouts(0)
    rng = np.random.default_rng(1)
    own = relational_predict(feats, TRUE, 10) + rng.normal(size=len(feats)) * 0.1
    beta, y = 0.9, np.zeros(len(own))
    for lo in range(0, len(own), 10):
        carried = 5.0 * own.std()  # the round's momentum, before the rollout's first step
        for k in range(10):
            carried = beta * carried + (1 - beta) * own[lo + k]
            y[lo + k] = carried
    fresh = _rollouts(2)
    want = relational_predict(fresh, TRUE, 10)
    cfg = RelationalConfig(deconvolve=beta, center_positions=True)
    fit, result = fit_relational(feats, y, cfg, seed=0)
    raw, raw_result = fit_relational(feats, y, RelationalConfig(), seed=0)
    assert spearman(relational_predict(fresh, fit, 10), want) > 0.95
    assert spearman(relational_predict(fresh, raw, 10), want) < 0.9
    assert result.spearman > raw_result.spearman


def test_early_stopping_keeps_the_step_count_the_folds_rank_best():
    """Few rollouts of wide, noisy features (6 of 10 samples, 40 features, 2 of them the signal): 300 Adam steps
    fit the noise; chosen by the folds, the fit stops early and ranks fresh rollouts better."""
    rng = np.random.default_rng(3)
    w = np.zeros(40)
    w[:2] = 1.0
    feats, fresh = rng.normal(size=(60, 40)), rng.normal(size=(300, 40))
    y = feats @ w + rng.normal(size=60) * 1.5
    fixed, fixed_result = fit_relational(feats, y, RelationalConfig(folds=3), seed=0)
    early, result = fit_relational(feats, y, RelationalConfig(folds=3, early_stop=True), seed=0)
    ladder = [h["steps"] for h in result.history[:-1]]
    assert ladder == step_ladder(300) == [0, 1, 3, 10, 30, 100, 300]
    chosen = result.history[-1]["steps"]
    assert chosen < 300 and result.spearman == max(h["spearman"] for h in result.history[:-1])
    assert fixed_result.history[-1]["steps"] == 300 and len(fixed_result.history) == 1
    want = fresh @ w
    assert spearman(relational_predict(fresh, early, 10), want) > spearman(
        relational_predict(fresh, fixed, 10), want
    )


def test_the_head_penalty_shrinks_the_head():
    feats = _rollouts(0)
    y = relational_predict(feats, TRUE, 10) + np.random.default_rng(1).normal(size=len(feats))
    free, _ = fit_relational(feats, y, RelationalConfig(), seed=0)
    held, _ = fit_relational(feats, y, RelationalConfig(head_l2=1.0), seed=0)
    assert np.linalg.norm(held.w * feats.std(0)) < 0.5 * np.linalg.norm(free.w * feats.std(0))


def test_the_config_section_is_read_and_checked():
    cfg = InfluenceConfig(model="relational")
    assert cfg.relational.rollout_length == 10
    with pytest.raises(ValueError, match="RelationalConfig needs rollout_length >= 2"):
        RelationalConfig(rollout_length=1)
    with pytest.raises(ValueError, match=r"0 <= deconvolve < 1 \(the run's Adam beta1"):
        RelationalConfig(deconvolve=1.0)


def test_the_model_fits_on_real_encoder_features_and_keeps_its_terms_in_its_state():
    from mates_megatron.influence import build_influence_model
    from mates_megatron.influence.config import RidgeConfig

    cfg = InfluenceConfig(model="relational", ridge=RidgeConfig(features="token_embeddings"),
                          relational=RelationalConfig(rollout_length=4, steps=50))  # fmt: skip
    words = ["river", "stone", "python", "module", "import", "bread", "garden", "compile"]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 12)) for _ in range(40)]
    scores = np.array([t.count("python") + t.count("module") - t.count("bread") for t in texts], dtype=float)
    model = build_influence_model(cfg)
    result = model.fit(texts, scores)
    assert np.isfinite(result.spearman) and model.temperature > 0
    own = model.predict(texts)
    feats = model.embed(texts)
    w = model.net.head.weight.detach().double().numpy()[0]
    np.testing.assert_allclose(own, feats @ w + float(model.net.head.bias), rtol=1e-5, atol=1e-6)
    state = model.state_dict()
    again = build_influence_model(cfg)
    again.load_state_dict(state)
    assert (again.alpha, again.temperature) == (model.alpha, model.temperature)
    np.testing.assert_array_equal(again.predict(texts), own)

"""`bench relational-fit`'s reading of fit variants, on rollouts made from a known model as Adam's momentum
makes them (the bench's real rounds need a trained GPT: `mates-lab bench relational-fit`)."""

from __future__ import annotations

import numpy as np
import pytest

from mates_lab.bench.relational_fit import VARIANTS, evaluate_rounds
from mates_megatron.influence.config import RelationalConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # thousands of small Adam steps


def _round(seed: int, n: int = 150, d: int = 6, beta: float = 0.9):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, d)) * 2
    feats = centers[rng.integers(0, 4, n)] + rng.normal(size=(n, d)) * 0.7
    own = feats @ np.random.default_rng(9).normal(size=d) + rng.normal(size=n) * 0.1  # each sample's own
    rollout = np.zeros(n)
    for lo in range(0, n, 10):
        carried = 5.0 * own.std()  # the round's momentum, before the rollout's first step
        for k in range(10):
            carried = beta * carried + (1 - beta) * own[lo + k]
            rollout[lo + k] = carried
    return feats, rollout, own


def test_each_variant_is_read_against_the_samples_own_influence_round_by_round():
    rounds = [_round(s) for s in (0, 1)]
    feats, rollout, own = (list(x) for x in zip(*rounds, strict=True))
    base = RelationalConfig(steps=50, folds=3)
    got = evaluate_rounds(feats, rollout, own, base, influence_rounds=2, rollouts=None, seed=0)
    assert [r["pairs"] for r in got] == [150, 300]  # the second round fits on both, as a run with 2 rounds
    for r in got:
        assert set(VARIANTS) | {"ridge_on_individual"} <= set(r)
        # The momentum's carry hides the samples from the raw fit; deconvolved and centred, the head finds them,
        # as well as a ridge on the samples' own scores (the truth) does.
        assert r["deconvolved_centred"]["own"] > 0.9 > r["authors"]["own"]
        assert r["ridge_on_individual"]["own"] > 0.85
    # The first 5 rollouts of each round only: fewer pairs, the same rounds.
    few = evaluate_rounds(feats, rollout, own, base, influence_rounds=2, rollouts=5, seed=0)
    assert [r["pairs"] for r in few] == [50, 100]

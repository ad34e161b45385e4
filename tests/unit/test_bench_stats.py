"""The benchmark's rank correlation equals scipy's."""

import numpy as np
from scipy.stats import spearmanr

from mates_megatron.stats import spearman


def test_spearman_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=200)
    b = a + rng.normal(scale=2.0, size=200)
    assert abs(spearman(a, b) - spearmanr(a, b).statistic) < 1e-12
    assert spearman(a, a) == 1.0
    assert abs(spearman(a, -a) + 1.0) < 1e-12

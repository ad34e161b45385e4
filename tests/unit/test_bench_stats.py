"""Rank and linear correlations equal scipy's, ties included, and are NaN exactly when undefined."""

import math
import warnings

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from mates_megatron.stats import pearson, spearman


def test_spearman_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=200)
    b = a + rng.normal(scale=2.0, size=200)
    assert abs(spearman(a, b) - spearmanr(a, b).statistic) < 1e-12
    assert spearman(a, a) == 1.0
    assert abs(spearman(a, -a) + 1.0) < 1e-12


def test_spearman_ranks_ties_by_their_average():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 5, size=300).astype(float)  # heavy ties in both inputs
    b = a + rng.integers(0, 3, size=300)
    assert abs(spearman(a, b) - spearmanr(a, b).statistic) < 1e-12
    # By hand: ranks 1, 2.5, 2.5, 4 against 1, 2, 3, 4.
    tied, plain = np.array([0.0, 1.0, 1.0, 2.0]), np.array([0.0, 1.0, 2.0, 3.0])
    r = np.array([1.0, 2.5, 2.5, 4.0])
    assert abs(spearman(tied, plain) - np.corrcoef(r, [1, 2, 3, 4])[0, 1]) < 1e-12
    # Ignoring ties (ordinal ranks) would give 1.0 here.
    assert spearman(tied, plain) < 1.0


def test_undefined_correlations_are_nan_without_warnings():
    a = np.arange(5.0)
    with np.errstate(all="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        for f in (spearman, pearson):
            assert math.isnan(f(a, np.full(5, 2.0)))  # a constant input
            assert math.isnan(f(np.full(5, 2.0), a))
            assert math.isnan(f([1.0], [2.0]))  # fewer than two pairs
            assert math.isnan(f([], []))
    assert math.isnan(spearman([1.0, np.nan, 3.0], [1.0, 2.0, 3.0]))  # NaN propagates
    with pytest.raises(ValueError, match="3 values with 2 values"):
        spearman([1, 2, 3], [1, 2])


def test_pearson_matches_scipy():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert abs(pearson(a, b) - pearsonr(a, b).statistic) < 1e-12

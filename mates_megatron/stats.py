"""Small statistics shared by the probes, the influence model and the benchmarks."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import spearmanr


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"correlation of {a.size} values with {b.size} values: give equal lengths")
    return a, b


def _undefined(a: np.ndarray, b: np.ndarray) -> bool:
    """Fewer than two pairs, or an input with no spread: the correlation has no value."""
    return a.size < 2 or bool(np.all(a == a[0])) or bool(np.all(b == b[0]))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation, ties ranked by their average (scipy.stats.spearmanr).

    NaN, without a warning, when it is undefined: fewer than two pairs or a constant input. NaN in either
    input gives NaN.
    """
    a, b = _pair(a, b)
    if _undefined(a, b):
        return math.nan
    return float(spearmanr(a, b).statistic)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN, without a warning, when undefined (as ``spearman``)."""
    a, b = _pair(a, b)
    if _undefined(a, b):
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])

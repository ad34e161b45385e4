"""Figures over seeds: the mean and its 95% t-interval (the benches that report a mean over seeds)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def mean_ci(values) -> dict[str, Any]:
    """Mean and 95% t-interval over seeds (the interval is null for one seed)."""
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return {"per_seed": v.tolist(), "mean": mean, "ci95": None}
    half = float(t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"per_seed": v.tolist(), "mean": mean, "ci95": [mean - half, mean + half]}


def t_interval(values) -> list[float] | None:
    """95% t-interval of the mean (None for one value)."""
    return mean_ci(values)["ci95"]

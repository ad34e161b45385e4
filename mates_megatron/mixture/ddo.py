"""DDO (Direct Data Optimization, Kang et al., AutoScale, COLM 2025): the compute-optimal mixture at one scale.

From 2m+1 proxy runs (see ``mixture.plan``): the uniform base (every domain the same amount, 1 unit), and
each domain i alone scaled by x (down and up; the other domains stay at 1). For domain i, the validation
objective of those runs relative to the base is fitted as ``y_i(x) = (x + a_i)^(-b_i) + c_i`` (scipy's
curve_fit; three points, three parameters: an exact fit where the form can pass through them). The mixture
is then the amounts n (in units) that minimise ``sum_i (n_i + a_i)^(-b_i)`` subject to ``sum_i n_i = m`` and
``n_i >= floor``, by projected gradient descent onto that capped simplex (the projection is exact, the step
backtracks, so the descent converges on this convex problem); the weights are ``n / m``.

The authors' code projects by subtracting the mean gradient and clamping violators at the floor afterwards,
with a fixed step; the exact projection reaches the same optimum without the clamp's drift (checked against
scipy's SLSQP in the tests).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DomainFit:
    """``y(x) = (x + a)^(-b) + c``: the objective as a function of one domain's amount (base = 1)."""

    a: float
    b: float
    c: float
    residual: float
    """Largest absolute error of the fit at the measured points (the fit minimises their squared errors)."""

    def __call__(self, x):
        return (np.asarray(x, dtype=np.float64) + self.a) ** (-self.b) + self.c


def fit_domain(x: np.ndarray, y: np.ndarray, *, floor: float) -> DomainFit:
    """Fit ``(x + a)^(-b) + c`` to the points; ``a > -floor`` keeps the curve defined down to the floor.

    ``b`` is bounded to [0, 10]: a domain whose extra data makes the objective worse fits b ~ 0 (flat), so it
    attracts no data and the others' gains move it to the floor.
    """
    from scipy.optimize import curve_fit

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"DDO fit: non-finite points x={x.tolist()}, y={y.tolist()}")

    def f(x, a, b, c):
        return (x + a) ** (-b) + c

    lower, upper = [-floor + 1e-6, 0.0, -np.inf], [1e3, 10.0, np.inf]
    # curve_fit is local, and (a, b) trade off along valleys: start it from the best point of a grid over
    # (a, b), where c has its least-squares value in closed form (the form is linear in c).
    ga = -floor + np.geomspace(1e-3, 1e3, 120)
    gb = np.linspace(0.0, 10.0, 201)
    pw = (x[None, None, :] + ga[:, None, None]) ** (-gb[None, :, None])
    gc = (y[None, None, :] - pw).mean(-1)
    sse = ((pw + gc[..., None] - y) ** 2).sum(-1)
    i, j = np.unravel_index(np.argmin(sse), sse.shape)
    p = np.array([ga[i], gb[j], gc[i, j]])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q, _ = curve_fit(f, x, y, p0=p, bounds=(lower, upper), maxfev=20000)
        if ((f(x, *q) - y) ** 2).sum() < sse[i, j]:
            p = q
    except RuntimeError:
        pass  # the grid point stands
    a, b, c = p
    return DomainFit(float(a), float(b), float(c), float(np.abs(f(x, *p) - y).max()))


def project_capped_simplex(v: np.ndarray, total: float, floor: float) -> np.ndarray:
    """Euclidean projection of v onto {n : sum n = total, n >= floor} (Duchi et al. 2008, shifted)."""
    m = len(v)
    if total < m * floor - 1e-12:
        raise ValueError(f"budget {total} is below {m} domains x floor {floor}")
    u = np.asarray(v, dtype=np.float64) - floor
    z = total - m * floor
    s = np.sort(u)[::-1]
    css = np.cumsum(s) - z
    rho = np.flatnonzero(s - css / np.arange(1, m + 1) > 0)[-1]
    theta = css[rho] / (rho + 1)
    return np.maximum(u - theta, 0.0) + floor


def optimise_amounts(
    fits: list[DomainFit],
    *,
    total: float | None = None,
    floor: float = 0.2,
    iters: int = 5000,
    tol: float = 1e-12,
) -> np.ndarray:
    """Amounts n minimising ``sum_i fits[i](n_i)`` with ``sum n = total`` (default m) and ``n_i >= floor``."""
    m = len(fits)
    total = float(m if total is None else total)
    a = np.array([f.a for f in fits])
    b = np.array([f.b for f in fits])

    def obj(n):
        return float(np.sum((n + a) ** (-b)))

    n = np.full(m, total / m)
    step = 0.1
    for _ in range(iters):
        g = -b * (n + a) ** (-b - 1)
        f0 = obj(n)
        while True:  # backtracking (Armijo on the projected step)
            new = project_capped_simplex(n - step * g, total, floor)
            if obj(new) <= f0 + g @ (new - n) + 0.5 / step * np.sum((new - n) ** 2) + 1e-15:
                break
            step *= 0.5
        if np.abs(new - n).max() < tol:
            n = new
            break
        n, step = new, step * 1.5
    return n


def ddo_weights(
    base: float, runs: dict[str, list[tuple[float, float]]], domains: list[str], *, floor: float = 0.2
) -> tuple[np.ndarray, list[DomainFit]]:
    """The DDO weights from the proxy results.

    ``base``: the base run's objective; ``runs[domain]``: (x, objective) of that domain's scaled runs. Each
    domain is fitted on its runs and the base (x = 1), with the objective relative to the base's.
    """
    fits = []
    for d in domains:
        pts = sorted([(1.0, 1.0)] + [(x, y / base) for x, y in runs[d]])
        fits.append(fit_domain(np.array([p[0] for p in pts]), np.array([p[1] for p in pts]), floor=floor))
    n = optimise_amounts(fits, floor=floor)
    return n / n.sum(), fits

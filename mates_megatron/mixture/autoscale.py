"""AutoScale (Kang et al., COLM 2025): extrapolate DDO's compute-optimal mixture to a larger budget.

With the optimal per-domain amounts N^(1) and N^(2) found by DDO at two budgets, the optimal amounts follow
``N_i*(t) = N_i^(1) * (N_i^(2) / N_i^(1))^t`` (log N_i* affine in one scalar; the KKT conditions of a loss
``sum_i beta_i N_i^(-gamma_i)`` give it). For a target budget N, t solves ``sum_i N_i*(t) = N`` (t = 1 is the
second budget; the paper's doubling step N^(3) = N^(2) * N^(2) / N^(1) is t = 2 when the budgets double).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mates_megatron.mixture.weights import (
    MixtureError,
    WeightSchedule,
    cap_unrepeated,
    constant,
    read_weights,
)


def autoscale_amounts(n1: np.ndarray, n2: np.ndarray, budget: float) -> tuple[np.ndarray, float]:
    """Per-domain amounts at ``budget`` and the t that reaches it; amounts in the same unit as n1, n2."""
    from scipy.optimize import brentq

    n1, n2 = np.asarray(n1, dtype=np.float64), np.asarray(n2, dtype=np.float64)
    if n1.shape != n2.shape or (n1 <= 0).any() or (n2 <= 0).any():
        raise ValueError(
            "AutoScale needs positive amounts for every domain at both budgets (a DDO floor keeps them so); "
            f"got {n1.tolist()} and {n2.tolist()}"
        )
    b1, b2 = n1.sum(), n2.sum()
    if not b2 > b1:
        raise ValueError(f"AutoScale extrapolates from a smaller budget to a larger one; got {b1} then {b2}")
    if not budget > 0:
        raise ValueError(f"target budget must be positive, got {budget}")
    log_r = np.log(n2 / n1)

    def total(t: float) -> float:
        return float(np.sum(n1 * np.exp(t * log_r))) - budget

    # sum_i N_i(t) is convex in t and rising at t = 1 (b2 > b1) on the side of larger budgets: bracket it.
    lo, hi = (1.0, 2.0) if budget >= b2 else (-1.0, 1.0)
    while total(hi) < 0:
        hi = 2 * hi
        if hi > 1e6:
            raise ValueError(f"AutoScale: no t reaches the budget {budget}")
    while total(lo) > 0:
        lo -= 1.0
        if lo < -1e6:
            raise ValueError(f"AutoScale: no t reaches the budget {budget}")
    t = brentq(total, lo, hi, xtol=1e-14, rtol=1e-14)
    return n1 * np.exp(t * log_r), float(t)


def autoscale_weights(
    small: Path, large: Path, steps: int, *, available_tokens: dict[str, float] | None = None
) -> WeightSchedule:
    """The AutoScale weights schedule at ``steps`` from two DDO weight files of the same plan settings.

    ``available_tokens`` (tokens per domain, e.g. ``read_domain_tokens``): cap each domain at its unrepeated
    share of the target's tokens (``cap_unrepeated``); the form assumes fresh data, so a predicted amount
    beyond what a domain holds is not one it can serve unrepeated. The uncapped weights stay in the source."""
    s1, s2 = read_weights(small), read_weights(large)
    for s, p in ((s1, small), (s2, large)):
        if "amounts_samples" not in s.source or "steps" not in s.source:
            raise MixtureError(
                f"{p}: not a DDO result (no amounts); write it with `mates-megatron mixture fit`"
            )
    domains = s1.domains
    if set(s2.domains) != set(domains):
        raise MixtureError(f"{small} and {large} name different domains")
    n1 = np.array([s1.source["amounts_samples"][d] for d in domains])
    n2 = np.array([s2.source["amounts_samples"][d] for d in domains])
    per_step = s1.source["budget_samples"] / s1.source["steps"]
    if not np.isclose(per_step, s2.source["budget_samples"] / s2.source["steps"]):
        raise MixtureError(f"{small} and {large} were planned with different global batch sizes")
    amounts, t = autoscale_amounts(n1, n2, steps * per_step)
    weights = dict(zip(domains, (amounts / amounts.sum()).tolist(), strict=True))
    source = {
        "method": "autoscale", "small": str(small), "large": str(large), "t": t, "steps": steps,
        "budget_samples": steps * per_step, "amounts_samples": dict(zip(domains, amounts.tolist(), strict=True)),
    }  # fmt: skip
    if available_tokens is not None:
        if "budget_tokens" not in s1.source:
            raise MixtureError(f"{small}: no budget_tokens (a DDO file from an older fit); fit it again")
        budget_tokens = steps * s1.source["budget_tokens"] / s1.source["steps"]
        source.update({"uncapped_weights": weights, "budget_tokens": budget_tokens,
                       "available_tokens": dict(available_tokens)})  # fmt: skip
        weights = cap_unrepeated(weights, available_tokens, budget_tokens)
    return constant(weights, source)

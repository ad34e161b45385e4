"""The truth-aware reference of ``bench dam``: NOT a buyer strategy (it reads the sellers' hidden noise rates,
``Seller.truth``), an upper bound on what a buyer who ranked the sellers' label noise perfectly could get by
dropping the noisy ones; with it, the headroom above uniform spend is known and a buyer strategy's share of it
can be reported.

- ``oracle_purchase``: the budget spread like ``uniform`` over the sellers whose hidden noise rate is below
  ``threshold`` (nothing from the others); with no seller below it, uniform over the cleanest seller(s).

A strategy's share of the headroom is ``mates_lab.bench.dam.headroom_share``.

It is kept out of ``STRATEGIES`` on purpose: a registered strategy gets only the public ``MarketView``.
"""

from __future__ import annotations

from dataclasses import replace

from mates_lab.acquisition.market import Market
from mates_lab.acquisition.score import validate_purchase
from mates_lab.acquisition.strategies import uniform

ORACLE_THRESHOLDS = (0.05, 0.1, 0.2, 0.3)
"""Noise-rate thresholds the bench reports the oracle at (``oracle@T``)."""
ORACLE_THRESHOLD = 0.3
"""The threshold of the headroom's oracle: the best of ``ORACLE_THRESHOLDS`` by mean dam_score on markets
200-202 (0.650, 0.666, 0.697, 0.704 at 0.05, 0.1, 0.2, 0.3; uniform 0.678), which the reported markets
(0-4, 100-109) do not include; docs/results/dam.md."""
UPPER_BOUND_LABEL = "oracle: truth-aware upper bound (reads hidden noise rates), not a buyer strategy"


def oracle_purchase(market: Market, threshold: float = ORACLE_THRESHOLD, seed: int = 0) -> dict[str, int]:
    """Uniform spend over the sellers whose hidden ``truth["noise_rate"]`` is below ``threshold``."""
    if not threshold > 0:
        raise ValueError(f"oracle threshold={threshold} must be > 0")
    noise = {s.name: _noise_rate(s) for s in market.sellers}
    keep = {n for n, r in noise.items() if r < threshold}
    if not keep:  # no seller that clean: the cleanest one(s), not nothing
        keep = {n for n, r in noise.items() if r == min(noise.values())}
    view = market.view()
    kept = replace(view, sellers=tuple(s for s in view.sellers if s.name in keep))
    return validate_purchase(market, {s.name: 0 for s in view.sellers} | uniform(kept, seed))


def _noise_rate(seller) -> float:
    if "noise_rate" not in seller.truth:
        raise ValueError(
            f"seller {seller.name!r} has no truth['noise_rate']: the oracle needs a market from build_market"
        )
    return float(seller.truth["noise_rate"])

"""The DataPerf DAM (data acquisition) benchmark: markets of sellers with hidden rows, buyer strategies that
see only a public view, and the scorer (logistic-regression accuracy on a hidden test set, DataPerf's
``0.98 * accuracy + 0.02 * unspent budget share``)."""

from mates_lab.acquisition.coverage import coverage, reweighted_worth  # registers "lava-cover"
from mates_lab.acquisition.market import (
    Market,
    MarketError,
    MarketView,
    Seller,
    SellerView,
    build_market,
    load_market,
    save_market,
)
from mates_lab.acquisition.oracle import ORACLE_THRESHOLD, ORACLE_THRESHOLDS, oracle_purchase
from mates_lab.acquisition.score import cost, dam_score, score, validate_purchase
from mates_lab.acquisition.strategies import STRATEGIES, get_strategy, rows_for_mixture, run_strategy

__all__ = [
    "ORACLE_THRESHOLD",
    "ORACLE_THRESHOLDS",
    "STRATEGIES",
    "Market",
    "MarketError",
    "MarketView",
    "Seller",
    "SellerView",
    "build_market",
    "cost",
    "coverage",
    "dam_score",
    "get_strategy",
    "load_market",
    "oracle_purchase",
    "rows_for_mixture",
    "reweighted_worth",
    "run_strategy",
    "save_market",
    "score",
    "validate_purchase",
]

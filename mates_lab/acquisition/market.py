"""The DataPerf DAM market: sellers with hidden rows, a buyer with a budget and a small labelled eval set.

A market is built from a labelled pool (``build_market``), saved as a directory (``market.json``: everything
but arrays; ``arrays.npz``: the arrays, written byte-identically for the same market) and read back with
``load_market``, which checks it and names the file and the fix when something is wrong. A buyer strategy
sees only ``Market.view()`` (``MarketView``): prices, sizes, summaries and sample rows, the buyer's eval set
and the budget; the sellers' hidden rows and the test set stay in the ``Market``.

How ``build_market`` makes sellers differ in value (every knob drawn from the seed, independently of the
others, so quality and price are unrelated and the cheapest rows are not the best, nor the dearest):

- label noise: the rates are spread evenly over ``[0, max_noise]`` and shuffled over the sellers; a flipped
  label goes to ``derangement[label]``, a seller-specific class permutation with no fixed point (systematic
  noise, as one mislabelling pipeline makes, which hurts a linear model more than uniform flips);
- label skew, cycled over the sellers then shuffled: 'balanced' (equal class shares), 'mild' (Dirichlet(2)
  shares), 'strong' (one or two classes hold 90% of the rows);
- duplicates: some sellers pad their rows with copies of their own rows (25% or 50% of them);
- source skew: within a class a seller draws pool rows with weights by ``groups`` (its own Dirichlet weights
  over the sources; no effect when the groups are the labels, as in ``bench dam``);
- size: uniform in ``rows``; price per row: uniform in ``prices``, rounded to cents.

Rows are disjoint across the sellers, the buyer's eval set and the test set (duplicates repeat a seller's own
rows). The eval set (``eval_per_class`` per class) and the test set (``test_per_class`` per class) are clean
and class-balanced. The budget is a seeded share in ``budget_share`` of the value of all rows at their
prices, rounded down to cents. Each seller publishes ``sample_rows`` of its hidden rows (noise and skew
included) and a summary of public facts (row count, label histogram of its labels as it holds them, the norm
of its feature mean, its mean feature standard deviation).
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mates_megatron.files import atomic_path

FORMAT = "mates-dam-market/1"
MARKET_JSON = "market.json"
ARRAYS = "arrays.npz"
_SEED_TAG = 0xDA3  # the builder's stream: default_rng([seed, _SEED_TAG])
_SKEWS = ("balanced", "mild", "strong")
_DUPLICATES = (0.5, 0.0, 0.25, 0.0)


class MarketError(ValueError):
    """A market file, or a purchase, that cannot be used; the message names the file or seller and the fix."""


@dataclass
class Seller:
    """One seller: public price, summary and sample, hidden rows."""

    name: str
    price: float
    """Price per row (> 0)."""
    features: np.ndarray
    """Hidden rows, float32 [n, d]."""
    labels: np.ndarray
    """Hidden labels, int64 [n] (noise included: the labels as the seller holds them)."""
    sample: np.ndarray
    """Indices into the hidden rows of the published sample rows, int64 [s]."""
    summary: dict[str, Any]
    """Public facts: rows, label_histogram, feature_mean_norm, feature_std."""
    truth: dict[str, Any] = field(default_factory=dict)
    """How the builder made the seller (noise rate, skew, duplicates); hidden, for analysis only."""

    @property
    def rows(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class SellerView:
    """What a buyer sees of a seller."""

    name: str
    price: float
    rows: int
    summary: dict[str, Any]
    sample_features: np.ndarray
    """The published sample rows (read-only copies)."""
    sample_labels: np.ndarray


@dataclass(frozen=True)
class MarketView:
    """What a buyer strategy may see: no hidden row and no test row is reachable from here."""

    sellers: tuple[SellerView, ...]
    eval_features: np.ndarray
    """The buyer's own small labelled set (read-only copies)."""
    eval_labels: np.ndarray
    budget: float
    classes: int


@dataclass
class Market:
    """Sellers, the buyer's eval set and budget, and the hidden test set."""

    sellers: list[Seller]
    eval_features: np.ndarray
    eval_labels: np.ndarray
    test_features: np.ndarray
    """Hidden test rows from the buyer's distribution (clean, class-balanced)."""
    test_labels: np.ndarray
    budget: float
    classes: int
    seed: int
    build: dict[str, Any] = field(default_factory=dict)
    """The builder's options (recorded, not used)."""

    def seller(self, name: str) -> Seller:
        for s in self.sellers:
            if s.name == name:
                return s
        raise MarketError(f"no seller {name!r} in this market (sellers: {', '.join(self.names())})")

    def names(self) -> list[str]:
        return [s.name for s in self.sellers]

    def view(self) -> MarketView:
        return MarketView(
            sellers=tuple(
                SellerView(s.name, s.price, s.rows, json.loads(json.dumps(s.summary)),
                           _frozen(s.features[s.sample]), _frozen(s.labels[s.sample]))
                for s in self.sellers
            ),
            eval_features=_frozen(self.eval_features),
            eval_labels=_frozen(self.eval_labels),
            budget=self.budget,
            classes=self.classes,
        )  # fmt: skip


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


def summarize(features: np.ndarray, labels: np.ndarray, classes: int) -> dict[str, Any]:
    """A seller's public summary of its rows."""
    return {
        "rows": int(len(labels)),
        "label_histogram": np.bincount(labels, minlength=classes).astype(int).tolist(),
        "feature_mean_norm": round(float(np.linalg.norm(features.mean(0))), 6),
        "feature_std": round(float(features.std(0).mean()), 6),
    }


def build_market(
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    *,
    seed: int,
    sellers: int = 8,
    rows: tuple[int, int] = (60, 250),
    prices: tuple[float, float] = (0.5, 3.0),
    max_noise: float = 0.4,
    budget_share: tuple[float, float] = (0.2, 0.4),
    eval_per_class: int = 10,
    test_per_class: int = 100,
    sample_rows: int = 10,
) -> Market:
    """A market from a labelled pool (``features`` [n, d], ``labels`` [n] in [0, K), ``groups`` [n] source
    ids), the same for the same seed and arguments (see the module docstring for how sellers differ)."""
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels)
    g = np.asarray(groups)
    if x.ndim != 2 or len(x) != len(y) or len(y) != len(g):
        raise ValueError(f"features [n, d], labels [n] and groups [n] must agree; got {x.shape}, {y.shape}, {g.shape}")  # fmt: skip
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ValueError("labels must be integers in [0, K)")
    y = y.astype(np.int64)
    classes = int(y.max()) + 1
    if classes < 2:
        raise ValueError("the pool needs at least 2 classes")
    if sellers < 1 or not 1 <= rows[0] <= rows[1] or not 0 < prices[0] <= prices[1]:
        raise ValueError(f"need sellers >= 1, 1 <= rows[0] <= rows[1], 0 < prices[0] <= prices[1]; got {sellers}, {rows}, {prices}")  # fmt: skip
    if not 0 <= max_noise < 1 or not 0 < budget_share[0] <= budget_share[1] <= 1:
        raise ValueError(f"need 0 <= max_noise < 1 and 0 < budget_share[0] <= budget_share[1] <= 1; got {max_noise}, {budget_share}")  # fmt: skip
    rng = np.random.default_rng([seed, _SEED_TAG])
    group_ids = {v: i for i, v in enumerate(np.unique(g).tolist())}
    gi = np.array([group_ids[v] for v in g.tolist()], dtype=np.int64)

    # The buyer's eval set and the hidden test set first: clean, class-balanced, disjoint.
    free = [rng.permutation(np.flatnonzero(y == k)) for k in range(classes)]
    need = eval_per_class + test_per_class
    for k, rows_k in enumerate(free):
        if len(rows_k) < need + 1:
            raise ValueError(
                f"class {k} has {len(rows_k)} pool rows; the eval and test sets need {need} and the sellers "
                "some more: lower eval_per_class/test_per_class or give a larger pool"
            )
    eval_idx = np.concatenate([f[:eval_per_class] for f in free])
    test_idx = np.concatenate([f[eval_per_class:need] for f in free])
    free = [f[need:] for f in free]

    noise = rng.permutation(np.linspace(0.0, max_noise, sellers)) if sellers > 1 else np.zeros(1)
    skew = rng.permutation([_SKEWS[i % len(_SKEWS)] for i in range(sellers)])
    dups = rng.permutation([_DUPLICATES[i % len(_DUPLICATES)] for i in range(sellers)])
    out: list[Seller] = []
    for i in range(sellers):
        n = int(rng.integers(rows[0], rows[1] + 1))
        price = max(0.01, round(float(rng.uniform(*prices)), 2))
        share = _class_share(str(skew[i]), classes, rng)
        unique = max(1, n - int(round(dups[i] * n)))
        counts = rng.multinomial(unique, share)
        gw = 0.1 + rng.dirichlet(np.ones(len(group_ids)))
        picked = []
        for k in range(classes):
            take = min(int(counts[k]), len(free[k]))
            if take:
                w = gw[gi[free[k]]]
                pos = rng.choice(len(free[k]), size=take, replace=False, p=w / w.sum())
                picked.append(free[k][np.sort(pos)])
                free[k] = np.delete(free[k], pos)
        if not picked:
            raise ValueError(
                f"the pool ran out of rows at seller {i}: lower rows or sellers, or give a larger pool"
            )
        idx = np.concatenate(picked)
        true = y[idx]
        held = true.copy()
        perm = _derangement(classes, rng)
        flip = rng.choice(len(idx), size=int(round(noise[i] * len(idx))), replace=False)
        held[flip] = perm[true[flip]]
        extra = rng.integers(0, len(idx), size=n - len(idx)) if n > len(idx) and dups[i] > 0 else []
        order = rng.permutation(len(idx) + len(extra))
        all_idx = np.concatenate([np.arange(len(idx)), np.asarray(extra, dtype=np.int64)])[order]
        fx, fy = x[idx][all_idx], held[all_idx]
        sample = np.sort(rng.choice(len(fy), size=min(sample_rows, len(fy)), replace=False)).astype(np.int64)
        truth = {
            "noise_rate": round(float(len(flip) / len(idx)), 6), "skew": str(skew[i]),
            "duplicate_share": round(float(len(extra) / len(fy)), 6),
            "class_share": np.round(share, 6).tolist(), "derangement": perm.tolist(),
        }  # fmt: skip
        out.append(Seller(f"seller_{i:02d}", price, fx, fy, sample, summarize(fx, fy, classes), truth))

    value = math.fsum(s.price * s.rows for s in out)
    budget = math.floor(float(rng.uniform(*budget_share)) * value * 100) / 100
    build = {
        "sellers": sellers, "rows": list(rows), "prices": list(prices), "max_noise": max_noise,
        "budget_share": list(budget_share), "eval_per_class": eval_per_class,
        "test_per_class": test_per_class, "sample_rows": sample_rows,
        "budget_share_drawn": round(budget / value, 6) if value else 0.0,
    }  # fmt: skip
    market = Market(out, x[eval_idx], y[eval_idx], x[test_idx], y[test_idx], budget, classes, seed, build)
    check_market(market, "build_market")
    return market


def _class_share(kind: str, classes: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "balanced":
        return np.full(classes, 1.0 / classes)
    if kind == "mild":
        return rng.dirichlet(np.full(classes, 2.0))
    top = rng.choice(classes, size=min(classes, int(rng.integers(1, 3))), replace=False)
    share = np.full(classes, 0.1 / max(1, classes - len(top)))
    share[top] = 0.9 / len(top) if len(top) < classes else 1.0 / classes
    return share / share.sum()


def _derangement(k: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of range(k) with no fixed point: a class shift by a random offset in a random order."""
    order = rng.permutation(k)
    perm = np.empty(k, dtype=np.int64)
    perm[order] = np.roll(order, -int(rng.integers(1, k)))
    return perm


def check_market(market: Market, where: str) -> None:
    """Raise MarketError (naming ``where``) unless the market's arrays and numbers are consistent."""

    def bad(msg: str) -> MarketError:
        return MarketError(f"{where}: {msg}")

    if not market.sellers:
        raise bad("the market has no seller")
    if not (isinstance(market.budget, (int, float)) and math.isfinite(market.budget) and market.budget > 0):
        raise bad(f"budget {market.budget!r} must be a finite number > 0")
    k = market.classes
    if not isinstance(k, int) or k < 2:
        raise bad(f"classes {k!r} must be an integer >= 2")
    d = None
    names = set()
    pairs = [
        ("eval", market.eval_features, market.eval_labels),
        ("test", market.test_features, market.test_labels),
    ]
    pairs += [(f"seller {s.name!r}", s.features, s.labels) for s in market.sellers]
    for what, fx, fy in pairs:
        if fx.ndim != 2 or fy.ndim != 1 or len(fx) != len(fy) or len(fy) == 0:
            raise bad(f"{what} has features of shape {fx.shape} and labels of shape {fy.shape}; need [n, d] and [n], n >= 1")  # fmt: skip
        if d is not None and fx.shape[1] != d:
            raise bad(f"{what} has {fx.shape[1]} feature columns, the others {d}")
        d = fx.shape[1]
        if not np.issubdtype(fy.dtype, np.integer) or fy.min() < 0 or fy.max() >= k:
            raise bad(f"{what} has labels outside [0, {k})")
        if not np.isfinite(fx).all():
            raise bad(f"{what} has NaN or infinite features")
    for s in market.sellers:
        if s.name in names:
            raise bad(f"seller name {s.name!r} appears twice")
        names.add(s.name)
        if not (math.isfinite(s.price) and s.price > 0):
            raise bad(f"seller {s.name!r} has price {s.price!r}; a price per row must be > 0")
        if s.sample.ndim != 1 or (len(s.sample) and (s.sample.min() < 0 or s.sample.max() >= s.rows)):
            raise bad(f"seller {s.name!r} has sample indices outside [0, {s.rows})")
        if len(np.unique(s.sample)) != len(s.sample):
            raise bad(f"seller {s.name!r} lists a sample row twice")


# --- files ------------------------------------------------------------------------------------------------


def save_market(market: Market, directory: Path) -> Path:
    """``directory/market.json`` and ``directory/arrays.npz`` (the same bytes for the same market)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    check_market(market, "save_market")
    meta = {
        "format": FORMAT, "seed": market.seed, "budget": market.budget, "classes": market.classes,
        "build": market.build,
        "sellers": [{"name": s.name, "price": s.price, "rows": s.rows, "summary": s.summary, "truth": s.truth}
                    for s in market.sellers],
    }  # fmt: skip
    arrays = {"eval_features": market.eval_features, "eval_labels": market.eval_labels,
              "test_features": market.test_features, "test_labels": market.test_labels}  # fmt: skip
    for i, s in enumerate(market.sellers):
        arrays.update({f"s{i}_features": s.features, f"s{i}_labels": s.labels, f"s{i}_sample": s.sample})
    _write_npz(directory / ARRAYS, arrays)
    (directory / MARKET_JSON).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return directory


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez with fixed zip timestamps, so one market is always the same bytes."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, a in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(a), allow_pickle=False)


def load_market(directory: Path) -> Market:
    """The market saved in ``directory``; MarketError naming the file and the fix when it cannot be used."""
    directory = Path(directory)
    fix = "rebuild it with build_market and save_market"
    if not directory.is_dir():
        raise MarketError(f"{directory}: no market directory here ({MARKET_JSON} + {ARRAYS}); {fix}")
    mpath, apath = directory / MARKET_JSON, directory / ARRAYS
    if not mpath.is_file():
        raise MarketError(f"{mpath}: missing; a market directory holds {MARKET_JSON} and {ARRAYS}: {fix}")
    try:
        meta = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MarketError(f"{mpath}: not valid JSON ({e}); {fix}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise MarketError(f"{mpath}: format {got!r}, expected {FORMAT!r}; {fix}")
    for key in ("seed", "budget", "classes", "sellers"):
        if key not in meta:
            raise MarketError(f"{mpath}: no {key!r} entry; {fix}")
    if not apath.is_file():
        raise MarketError(f"{apath}: missing; a market directory holds {MARKET_JSON} and {ARRAYS}: {fix}")
    try:
        with np.load(apath, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # a truncated zip, a bad header, a pickled array: all the same to the user
        raise MarketError(f"{apath}: cannot be read ({type(e).__name__}: {e}); {fix}") from e

    def arr(name: str, who: str = "") -> np.ndarray:
        if name not in arrays:
            raise MarketError(f"{apath}: no array {name!r}{who}; {fix}")
        return arrays[name]

    try:
        sellers = []
        for i, s in enumerate(meta["sellers"]):
            who = f" (seller {s['name']!r})"
            seller = Seller(str(s["name"]), float(s["price"]), arr(f"s{i}_features", who),
                            arr(f"s{i}_labels", who), arr(f"s{i}_sample", who), s["summary"], s.get("truth", {}))  # fmt: skip
            if seller.rows != s["rows"]:
                raise MarketError(f"{apath}: seller {seller.name!r} has {seller.rows} rows, {MARKET_JSON} says {s['rows']}; {fix}")  # fmt: skip
            sellers.append(seller)
        market = Market(sellers, arr("eval_features"), arr("eval_labels"), arr("test_features"),
                        arr("test_labels"), float(meta["budget"]), int(meta["classes"]), int(meta["seed"]),
                        meta.get("build", {}))  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, MarketError):
            raise
        raise MarketError(f"{mpath}: a seller entry is malformed ({type(e).__name__}: {e}); {fix}") from e
    check_market(market, str(directory))
    return market

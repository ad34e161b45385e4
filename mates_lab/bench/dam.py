"""`bench dam`: the DataPerf DAM (data acquisition) benchmark on the embedded corpus.

The labelled pool is a 5-class text task: ``data/corpus.jsonl`` documents cut into pieces of about
``piece_chars`` characters (at most ``per_domain`` pieces per domain, a fixed seeded sample, so the pool and
its cached embeddings are the same for every seed), label = the piece's domain, features = the influence
encoder's normalised embeddings (``mates_megatron.encoder.Encoder``, cached in ``work/`` by a hash of the texts), groups = domain.
``markets`` markets are built with seeds ``seed .. seed + markets - 1`` (``acquisition.build_market``; each
saved under ``work/market_S/``), every registered strategy buys on each (its seed = the market's), and each
purchase is scored over ``draws`` draws.

Beside the strategies, the truth-aware oracle (``acquisition.oracle``: NOT a buyer strategy, it reads the
sellers' hidden noise rates) at every threshold of ``ORACLE_THRESHOLDS`` (``oracle@T``); the one at
``oracle_threshold`` (default ``ORACLE_THRESHOLD``, chosen on markets outside the reported ones) is the
upper bound of the headroom ``oracle - uniform``.

Figures: ``dam_score`` / ``accuracy`` / ``cost_share`` per strategy and oracle (means over the markets);
``strategies``: per strategy the dam_score's mean and 95% interval over the markets, the paired difference to
uniform with its interval and the share of the headroom (``headroom_share``); ``oracle``; ``per_market``;
``best_strategy`` and ``best_minus_uniform``; the Spearman correlation of the sellers' worths (``lava`` and
the class-reweighted ``lava-cover`` ones) with their hidden noise (negated), per market and with an interval.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mates_lab.bench.intervals import mean_ci

_POOL_SEED = 0x9C5


def corpus_pieces(
    path: Path, *, piece_chars: int = 240, per_domain: int = 600
) -> tuple[list[str], list[str]]:
    """Pieces of about ``piece_chars`` characters of every document (a last piece shorter than half of it is
    dropped), at most ``per_domain`` per domain (a fixed seeded sample, in corpus order), and their domains."""
    by: dict[str, list[str]] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, domain = row["text"], row["domain"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: need a JSON object with 'text' and 'domain' ({e})") from e
        pieces = [text[i : i + piece_chars] for i in range(0, len(text), piece_chars)]
        by.setdefault(domain, []).extend(p for p in pieces if len(p.strip()) >= piece_chars // 2)
    texts, domains = [], []
    for i, d in enumerate(sorted(by)):
        keep = by[d]
        if len(keep) > per_domain:
            rng = np.random.default_rng([_POOL_SEED, i])
            keep = [keep[k] for k in np.sort(rng.choice(len(keep), size=per_domain, replace=False))]
        texts += keep
        domains += [d] * len(keep)
    return texts, domains


def embed_pieces(texts: list[str], work: Path, max_length: int) -> np.ndarray:
    """Encoder embeddings of ``texts``, cached in ``work/dam_embeddings.npz`` (keyed by the texts' hash)."""
    key = hashlib.sha256(json.dumps([texts, max_length]).encode()).hexdigest()
    cache = Path(work) / "dam_embeddings.npz"
    if cache.is_file():
        with np.load(cache) as z:
            if str(z["fingerprint"]) == key:
                return z["features"]
    from mates_megatron.encoder import Encoder, EncoderConfig

    t = time.perf_counter()
    x = Encoder(EncoderConfig(max_length=max_length, batch_size=32)).embed(texts)
    print(f"[bench dam] embedded {len(texts)} pieces in {time.perf_counter() - t:.0f}s", flush=True)
    np.savez(cache, features=x, fingerprint=key)
    return x


def headroom_share(
    strategy: Sequence[float], uniform_: Sequence[float], oracle: Sequence[float]
) -> dict[str, Any]:
    """A strategy's share of the headroom above uniform: per market ``(strategy - uniform) / (oracle -
    uniform)`` (None where the oracle is not above uniform: those markets are counted apart), the mean of the
    shares with its 95% interval, and the ratio of the means ``mean(strategy - uniform) / mean(oracle -
    uniform)`` (steadier: one market with a tiny headroom cannot blow it up)."""
    s, u, o = (np.asarray(v, dtype=np.float64) for v in (strategy, uniform_, oracle))
    if not (s.shape == u.shape == o.shape) or s.ndim != 1 or len(s) == 0:
        raise ValueError(f"need three equal non-empty lists of per-market scores; got {s.shape}, {u.shape}, {o.shape}")  # fmt: skip
    head = o - u
    live = head > 0
    ratio = (s - u) / np.where(live, head, 1.0)
    shares = [float(r) if ok else None for r, ok in zip(ratio, live, strict=True)]
    kept = [r for r in shares if r is not None]
    return {
        "per_market": shares,
        "mean": mean_ci(kept) if kept else None,
        "markets_without_headroom": int((~live).sum()),
        "ratio_of_means": float((s - u).mean() / head.mean()) if head.mean() > 0 else None,
    }


def summarize(per_market: list[dict[str, Any]], strategies: list[str], oracle: str) -> dict[str, Any]:
    """Per strategy: dam_score mean and 95% interval over the markets, the paired difference to uniform with
    its interval, and the share of the headroom (``oracle`` - uniform)."""
    col = {name: [m[name]["dam_score"] for m in per_market] for name in [*strategies, oracle]}
    out: dict[str, Any] = {}
    for name in strategies:
        row: dict[str, Any] = {"dam_score": mean_ci(col[name])}
        if "uniform" in col:
            row["minus_uniform"] = mean_ci(np.subtract(col[name], col["uniform"]))
            row["headroom_share"] = headroom_share(col[name], col["uniform"], col[oracle])
        out[name] = row
    return out


def bench_dam(
    data: Path, work: Path, *, markets: int = 5, seed: int = 0, draws: int = 5, max_length: int = 128,
    per_domain: int = 600, strategies: list[str] | None = None, oracle_threshold: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    from scipy.stats import spearmanr

    from mates_lab.acquisition import (
        ORACLE_THRESHOLD,
        ORACLE_THRESHOLDS,
        STRATEGIES,
        build_market,
        oracle_purchase,
        reweighted_worth,
        run_strategy,
        save_market,
        score,
    )
    from mates_lab.acquisition.strategies import lava_worth, one_thread

    if markets < 1:
        raise ValueError(f"markets={markets} must be >= 1")
    threshold = ORACLE_THRESHOLD if oracle_threshold is None else oracle_threshold
    thresholds = sorted({*ORACLE_THRESHOLDS, threshold})
    t0 = time.perf_counter()
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    texts, domains = corpus_pieces(Path(data) / "corpus.jsonl", per_domain=per_domain)
    names = sorted(set(domains))
    labels = np.array([names.index(d) for d in domains], dtype=np.int64)
    print(
        f"[bench dam] pool: {len(texts)} pieces, {dict(zip(names, np.bincount(labels).tolist(), strict=True))}",
        flush=True,
    )
    x = embed_pieces(texts, work, max_length)
    strategies = strategies or STRATEGIES.names()
    per_market = []
    for s in range(seed, seed + markets):
        market = build_market(x, labels, labels, seed=s)
        save_market(market, work / f"market_{s}")
        row: dict[str, Any] = {"seed": s, "budget": market.budget, "sellers": len(market.sellers)}
        # The truth-aware upper bound at every threshold follows: NOT a buyer strategy (it reads the hidden
        # noise rates).
        for name in [*strategies, *(f"oracle@{t:g}" for t in thresholds)]:
            t = time.perf_counter()
            if name.startswith("oracle@"):
                purchase = oracle_purchase(market, float(name.removeprefix("oracle@")), s)
            else:
                purchase = run_strategy(name, market, s)
            r = score(market, purchase, draws=draws, seed=s)
            row[name] = {**r, "purchase": purchase, "seconds": time.perf_counter() - t}
            print(f"[bench dam] market {s} {name}: dam_score {r['dam_score']:.4f} accuracy {r['accuracy']:.4f} "
                  f"cost {r['cost_share']:.1%} of budget ({time.perf_counter() - t:.1f}s)", flush=True)  # fmt: skip
        # How well the LAVA seller worths (from 10 sample rows each) rank the sellers' hidden label noise.
        noise = [-seller.truth["noise_rate"] for seller in market.sellers]
        with one_thread():
            row["lava_worth_noise_spearman"] = float(spearmanr(lava_worth(market.view(), s), noise)[0])
        row["reweighted_worth_noise_spearman"] = float(
            spearmanr(reweighted_worth(market.view(), s), noise)[0]
        )
        per_market.append(row)

    result = {
        **figures(per_market, strategies, threshold),
        "markets": markets,
        "draws": draws,
        "pool": {"pieces": len(texts), "classes": names, "max_length": max_length},
        "wall_seconds": time.perf_counter() - t0,
    }
    print_table(result, strategies)
    return result


def figures(per_market: list[dict[str, Any]], strategies: list[str], threshold: float) -> dict[str, Any]:
    """The bench's figures over ``per_market`` (rows of ``bench_dam``, also rows of several runs joined, as
    ``figures([*a["per_market"], *b["per_market"]], ...)``), the headroom's oracle at ``threshold``."""
    from mates_lab.acquisition.oracle import UPPER_BOUND_LABEL

    oracle = f"oracle@{threshold:g}"
    thresholds = sorted(float(k.removeprefix("oracle@")) for k in per_market[0] if k.startswith("oracle@"))
    everything = [*strategies, *(f"oracle@{t:g}" for t in thresholds)]

    def mean(name: str, key: str) -> float:
        return float(np.mean([m[name][key] for m in per_market]))

    def over(key: str) -> dict[str, Any]:
        return mean_ci([m[key] for m in per_market])

    dam = {name: mean(name, "dam_score") for name in everything}
    best = max(strategies, key=lambda k: (dam[k], k))
    head = (
        [m[oracle]["dam_score"] - m["uniform"]["dam_score"] for m in per_market] if "uniform" in dam else None
    )
    return {
        "dam_score": dam,
        "accuracy": {name: mean(name, "accuracy") for name in everything},
        "cost_share": {name: mean(name, "cost_share") for name in everything},
        "strategies": summarize(per_market, strategies, oracle),
        "oracle": {
            "name": oracle,
            "threshold": threshold,
            "thresholds": thresholds,
            "note": UPPER_BOUND_LABEL,
            "dam_score": mean_ci([m[oracle]["dam_score"] for m in per_market]),
            "headroom": mean_ci(head) if head else None,
            "by_threshold": {
                f"oracle@{t:g}": mean_ci([m[f"oracle@{t:g}"]["dam_score"] for m in per_market])
                for t in thresholds
            },
        },  # fmt: skip
        "best_strategy": best,
        "best_minus_uniform": dam[best] - dam["uniform"] if "uniform" in dam else None,
        "lava_worth_noise_spearman": over("lava_worth_noise_spearman"),
        "reweighted_worth_noise_spearman": over("reweighted_worth_noise_spearman"),
        "markets_seeds": [m["seed"] for m in per_market],
        "per_market": per_market,
    }


def print_table(result: dict[str, Any], strategies: list[str]) -> None:
    o = result["oracle"]
    print(f"[bench dam] {o['name']} ({o['note']}): dam_score {_fmt(o['dam_score'])}"
          + (f", headroom over uniform {_fmt(o['headroom'])}" if o["headroom"] else ""), flush=True)  # fmt: skip
    for name in strategies:
        r = result["strategies"][name]
        line = f"[bench dam] {name:12s} dam_score {_fmt(r['dam_score'])}"
        if "minus_uniform" in r and name != "uniform":
            h = r["headroom_share"]
            line += (f"  - uniform {_fmt(r['minus_uniform'])}  headroom share {_fmt(h['mean'])}"
                     f" (ratio of means {h['ratio_of_means'] if h['ratio_of_means'] is None else round(h['ratio_of_means'], 3)},"
                     f" {h['markets_without_headroom']} markets without headroom)")  # fmt: skip
        print(line, flush=True)
    print(f"[bench dam] worth-noise Spearman: lava {_fmt(result['lava_worth_noise_spearman'])}, reweighted "
          f"{_fmt(result['reweighted_worth_noise_spearman'])} ({result['wall_seconds']:.0f}s)", flush=True)  # fmt: skip


def _fmt(m: dict[str, Any] | None) -> str:
    if m is None:
        return "n/a"
    ci = m["ci95"]
    return f"{m['mean']:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")

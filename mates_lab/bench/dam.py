"""`bench dam`: the DataPerf DAM (data acquisition) benchmark on the embedded corpus.

The labelled pool is a 5-class text task: ``data/corpus.jsonl`` documents cut into pieces of about
``piece_chars`` characters (at most ``per_domain`` pieces per domain, a fixed seeded sample, so the pool and
its cached embeddings are the same for every seed), label = the piece's domain, features = the influence
encoder's normalised embeddings (``mates_megatron.encoder.Encoder``, cached in ``work/`` by a hash of the texts), groups = domain.
``markets`` markets are built with seeds ``seed .. seed + markets - 1`` (``acquisition.build_market``; each
saved under ``work/market_S/``), every registered strategy buys on each (its seed = the market's), and each
purchase is scored over ``draws`` draws.

Figures: ``dam_score`` / ``accuracy`` / ``cost_share`` per strategy (means over the markets), ``per_market``,
``best_strategy`` and ``best_minus_uniform`` (its dam_score over uniform's).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

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


def bench_dam(
    data: Path, work: Path, *, markets: int = 5, seed: int = 0, draws: int = 5, max_length: int = 128,
    per_domain: int = 600, strategies: list[str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    from scipy.stats import spearmanr

    from mates_lab.acquisition import STRATEGIES, build_market, run_strategy, save_market, score
    from mates_lab.acquisition.strategies import lava_worth, one_thread

    if markets < 1:
        raise ValueError(f"markets={markets} must be >= 1")
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
        for name in strategies:
            t = time.perf_counter()
            purchase = run_strategy(name, market, s)
            r = score(market, purchase, draws=draws, seed=s)
            row[name] = {**r, "purchase": purchase, "seconds": time.perf_counter() - t}
            print(f"[bench dam] market {s} {name}: dam_score {r['dam_score']:.4f} accuracy {r['accuracy']:.4f} "
                  f"cost {r['cost_share']:.1%} of budget ({time.perf_counter() - t:.1f}s)", flush=True)  # fmt: skip
        # How well LAVA's seller worths (from 10 sample rows each) rank the sellers' hidden label noise.
        with one_thread():
            worth = lava_worth(market.view(), s)
        noise = [-seller.truth["noise_rate"] for seller in market.sellers]
        row["lava_worth_noise_spearman"] = float(spearmanr(worth, noise)[0])
        per_market.append(row)

    def mean(name: str, key: str) -> float:
        return float(np.mean([m[name][key] for m in per_market]))

    dam = {name: mean(name, "dam_score") for name in strategies}
    best = max(dam, key=lambda k: (dam[k], k))
    result = {
        "dam_score": dam,
        "accuracy": {name: mean(name, "accuracy") for name in strategies},
        "cost_share": {name: mean(name, "cost_share") for name in strategies},
        "best_strategy": best,
        "best_minus_uniform": dam[best] - dam["uniform"] if "uniform" in dam else None,
        "lava_worth_noise_spearman": float(np.mean([m["lava_worth_noise_spearman"] for m in per_market])),
        "per_market": per_market,
        "markets": markets,
        "draws": draws,
        "pool": {"pieces": len(texts), "classes": names, "max_length": max_length},
        "wall_seconds": time.perf_counter() - t0,
    }
    print(f"[bench dam] dam_score {json.dumps({k: round(v, 4) for k, v in dam.items()})} "
          f"({result['wall_seconds']:.0f}s)", flush=True)  # fmt: skip
    return result

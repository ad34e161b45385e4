"""FASTTRACK's offline index: the pool's encoder embeddings clustered recursively into small leaves, and
each leaf's keywords.

Built once per pool and saved beside its shards (``<dir>/fasttrack.npz`` + ``fasttrack.json``); read back
when the pool's fingerprint and the index settings are those it was built with, built again otherwise (and
the reason printed). The leaves are what a query is routed to: each leaf keeps the normalised mean of its
members' embeddings, its members as a contiguous run of ``order``, and its keywords: the words of its
members that occur in at most ``max_keyword_df`` of the pool's documents (the paper has an LLM write each
cluster's keywords; rare words are what this machine can say about a cluster without one). A query goes to
the leaves sharing its rarest words (sum of log(N / df) over the shared keywords), ties by embedding
similarity: a fact planted in documents about unrelated topics lands in different clusters, and only its
words (the entity's name) point at all of them.

Recursive k-means with scikit-learn's ``KMeans`` (seeded, one init): a node larger than ``leaf_size`` is
split into ``min(branching, ceil(n / leaf_size))`` clusters; a split that puts everything in one cluster
(duplicates) falls back to cutting the node in id order, so the recursion always ends.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mates_megatron.files import atomic_path, atomic_write_json

INDEX = "fasttrack"


@dataclass(frozen=True)
class IndexSettings:
    leaf_size: int = 64
    """Largest leaf (the paper: clusters of about 100)."""
    branching: int = 8
    seed: int = 0
    max_length: int = 128
    """Encoder tokens per document."""
    max_keyword_df: float = 0.01
    """A leaf's keywords are its words found in at most this share of the pool's documents."""

    def __post_init__(self) -> None:
        if self.leaf_size < 1 or self.branching < 2 or self.max_length < 8:
            raise ValueError(
                f"fasttrack index leaf_size={self.leaf_size}, branching={self.branching}, max_length="
                f"{self.max_length}: need leaf_size >= 1, branching >= 2, max_length >= 8"
            )


@dataclass
class FastTrackIndex:
    order: np.ndarray
    """int64 candidate ids grouped by leaf."""
    offsets: np.ndarray
    """int64 [leaves + 1]: leaf j's members are order[offsets[j]:offsets[j + 1]]."""
    centroids: np.ndarray
    """float32 [leaves, dim], L2-normalised."""
    kw_hash: np.ndarray
    """int64 keyword hashes (``word_hash``), sorted; one entry per (keyword, leaf) pair."""
    kw_leaf: np.ndarray
    """int64 leaf of each pair."""
    kw_idf: np.ndarray
    """float64 log(N / document frequency) of each pair's keyword."""

    @property
    def num_leaves(self) -> int:
        return len(self.offsets) - 1

    def members(self, leaf: int) -> np.ndarray:
        return self.order[self.offsets[leaf] : self.offsets[leaf + 1]]

    def route(self, words: list[str], embedding: np.ndarray, leaves: int) -> np.ndarray:
        """The ``leaves`` leaves for a query: by the idf of the query ``words`` among their keywords, then by
        cosine to the query's normalised ``embedding``, then by leaf id."""
        keyword = np.zeros(self.num_leaves)
        for h in {word_hash(w) for w in words}:
            lo, hi = np.searchsorted(self.kw_hash, [h, h + 1])
            keyword[self.kw_leaf[lo:hi]] += self.kw_idf[lo:hi]
        sim = self.centroids @ embedding
        return np.lexsort((np.arange(len(sim)), -sim, -keyword))[:leaves]

    def keywords(self, words: list[str]) -> set[int]:
        """The hashes of ``words`` that are keywords of some leaf (rare in the pool)."""
        hashes = np.array(sorted({word_hash(w) for w in words}), dtype=np.int64)
        found = np.searchsorted(self.kw_hash, hashes)
        ok = found < len(self.kw_hash)
        ok[ok] = self.kw_hash[found[ok]] == hashes[ok]
        return set(hashes[ok].tolist())


def word_hash(word: str) -> int:
    """A stable 63-bit hash of a word (Python's own hash is salted per process)."""
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") >> 1


def leaf_keywords(pool, leaves: list[np.ndarray], max_df: float):
    """(hash, leaf, idf) arrays of every leaf's keywords, sorted by hash (see the module doc)."""
    from mates_megatron.trace.bm25 import words

    doc_words = {}
    df: dict[int, int] = {}
    for leaf in leaves:
        for g in leaf:
            hs = {word_hash(w) for w in words(pool.text(int(g)))}
            doc_words[int(g)] = hs
            for h in hs:
                df[h] = df.get(h, 0) + 1
    n = len(doc_words)
    limit = max(1, int(max_df * n))
    pairs = sorted(
        (h, j)
        for j, leaf in enumerate(leaves)
        for h in set().union(*(doc_words[int(g)] for g in leaf))
        if df[h] <= limit
    )
    kw_hash = np.array([h for h, _ in pairs], dtype=np.int64)
    kw_leaf = np.array([j for _, j in pairs], dtype=np.int64)
    kw_idf = np.array([np.log(n / df[h]) for h, _ in pairs], dtype=np.float64)
    return kw_hash, kw_leaf, kw_idf


def recursive_kmeans(x: np.ndarray, ids: np.ndarray, settings: IndexSettings) -> list[np.ndarray]:
    """Leaves (arrays of ``ids``) of the recursive clustering of rows ``x``, depth-first in cluster order."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    leaves: list[np.ndarray] = []
    stack = [np.arange(len(ids))]
    while stack:
        node = stack.pop()
        if len(node) <= settings.leaf_size:
            leaves.append(ids[node])
            continue
        k = min(settings.branching, -(-len(node) // settings.leaf_size))
        with warnings.catch_warnings():  # duplicates: fewer distinct clusters, handled below
            warnings.simplefilter("ignore", ConvergenceWarning)
            labels = KMeans(n_clusters=k, n_init=1, random_state=settings.seed).fit_predict(x[node])
        parts = [node[labels == c] for c in range(k)]
        parts = [p for p in parts if len(p)]
        if len(parts) == 1:  # identical rows: cut in id order instead
            parts = np.array_split(node, k)
        stack += parts[::-1]
    return leaves


def _paths(directory: Path) -> tuple[Path, Path]:
    return directory / f"{INDEX}.npz", directory / f"{INDEX}.json"


def build_index(pool, embeddings: np.ndarray, ids: np.ndarray, settings: IndexSettings) -> FastTrackIndex:
    leaves = recursive_kmeans(embeddings, ids, settings)
    row = {int(g): i for i, g in enumerate(ids)}
    centroids = np.stack([embeddings[[row[int(g)] for g in leaf]].mean(axis=0) for leaf in leaves])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True).clip(min=1e-12)
    offsets = np.concatenate([[0], np.cumsum([len(leaf) for leaf in leaves])]).astype(np.int64)
    return FastTrackIndex(
        np.concatenate(leaves).astype(np.int64), offsets, centroids.astype(np.float32),
        *leaf_keywords(pool, leaves, settings.max_keyword_df),
    )  # fmt: skip


def load_or_build(
    directory: Path, pool, settings: IndexSettings, embed, *, log=print
) -> tuple[FastTrackIndex, str]:
    """(index, "reused" | "built: <why>") for ``pool``; ``embed(pool, ids) -> [n, dim]`` runs only to build.

    Written atomically, so an interrupted build leaves the old index (or none), never half of one.
    """
    npz, meta_path = _paths(Path(directory))
    want = {"pool_fingerprint": pool.fingerprint(), "num_candidates": len(pool), "settings": asdict(settings)}
    why = "no index yet"
    if npz.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        changed = [k for k in want if meta.get(k) != want[k]]
        if not changed:
            with np.load(npz) as z:
                return FastTrackIndex(**{k: z[k] for k in z.files}), "reused"
        why = "the " + " and ".join(k.replace("_", " ") for k in changed) + " changed"
    log(f"[trace] building the FASTTRACK index of {len(pool)} candidates in {directory} ({why})")
    t0 = time.perf_counter()
    ids = np.arange(len(pool), dtype=np.int64)
    index = build_index(pool, embed(pool, ids), ids, settings)
    with atomic_path(npz) as tmp:
        np.savez(tmp, **vars(index))
    meta = {**want, "leaves": index.num_leaves, "seconds": time.perf_counter() - t0}
    atomic_write_json(meta_path, meta)
    return index, f"built: {why}"

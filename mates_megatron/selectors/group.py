"""Group-MATES's selection (Yu et al. 2025, arXiv 2502.14709): a round chosen as a set, cluster by cluster.

Read from the authors' code (facebookresearch/Group-MATES, commit c95986b):

- **Relationship.** Two candidates with embeddings e_i, e_j relate by ``alpha * (1 - <e_i, e_j> / temperature)``
  (``modeling_data_influence_model.py``: ``penalties = (dot / temp - 1)``, negated): 0 for a duplicate at
  temperature 1, alpha for orthogonal ones. The i-th member of a sequence scores its individual score times
  its mean relationship to the members before it (the first member: its individual score), which is what
  the relational influence model is trained to predict (``relational_scores``).
- **Cluster-greedy selection** (``inference/clustering/select_indices.py``): the candidates are clustered by
  k-means on their embeddings (faiss, spherical, 100 iterations, seed 1234); each cluster gives the same
  share of its members (``int(ratio * len(cluster))``); inside a cluster the first pick is the lowest
  individual score and every later pick minimises ``score x mean relationship to those already picked``
  (``greedy_group``). Selection there runs with alpha = temperature = 1 (hard-coded, "TODO: should be
  assigned from the config file"), which are this selector's defaults.

What this module adds: an exact k. The authors' floor quotas leave the selection short of ``ratio * n``;
here the clusters' quotas are ``k * size / n`` rounded by largest remainders (ties to the lower cluster), so
the round always trains on its k samples. k-means is scikit-learn's (Lloyd, one initialisation seeded by
(seed, round)) on the L2-normalised embeddings, so a round's selection depends on its candidates, scores,
embeddings and seed only: a resumed run draws it again identically.

A quirk kept from the authors: scores are z-scored predictions (lower = better) and the relationship is
non-negative, so for a candidate with a negative score a larger relationship (less redundant) helps, and for
one with a positive score it hurts; a cluster whose quota reaches past its negative scores therefore prefers
redundant candidates among the rest. The selector records how many picks it made there
(``picks_at_positive_scores``).

Cost: a cluster of m candidates with quota q costs q passes over m embeddings (O(q m d)); with clusters of
about ``cluster_size`` candidates the round costs O(ratio x cluster_size x n x d): linear in the round. The
k-means over the whole round is not: ``iters x n x (n / cluster_size) x d``.

**Shards** (``shard_size``, this project's, for rounds of millions): the round's candidates are dealt into
``ceil(n / shard_size)`` shards by a permutation seeded by (seed, round), so each shard is a uniform sample of
the round whatever order the candidates come in; each shard takes its largest-remainder share of k and is
clustered and picked on its own, exactly as a round of that size would be. The k-means then costs
``iters x n x (shard_size / cluster_size) x d`` in all: linear in the round. The shards depend on the
candidates, the seed and the round only, never on the number of ranks: given a process group (``group``,
the hook passes a gloo group of the world), rank r does shards r, r + W, ... and the picks are all-gathered,
so every layout selects the same set. With scores and features given lazily (callables from positions to
rows, as 'group_mates' gives them: one encoder pass gives both), a rank scores and embeds its own shards
only. Without ``shard_size``: one shard, the
authors' selection, done by the group's first rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch.distributed as dist

from mates_megatron.selectors.base import SELECTORS, Selector, check_selection


def relationship(emb: np.ndarray, others: np.ndarray, *, alpha: float, temperature: float) -> np.ndarray:
    """``alpha * (1 - <e_i, e_j> / temperature)`` for every row i of ``emb`` against every row j of
    ``others``: float64 [len(emb), len(others)]."""
    dots = np.asarray(emb, dtype=np.float64) @ np.asarray(others, dtype=np.float64).T
    return alpha * (1.0 - dots / temperature)


def relational_scores(scores: np.ndarray, emb: np.ndarray, *, alpha: float, temperature: float) -> np.ndarray:
    """The scores of a sequence's members in order: the first its own score, the i-th its score times its
    mean relationship to members 0..i-1 (the relational influence model's output)."""
    scores = np.asarray(scores, dtype=np.float64)
    rel = relationship(emb, emb, alpha=alpha, temperature=temperature)
    out = scores.copy()
    for i in range(1, len(scores)):
        out[i] = scores[i] * rel[i, :i].mean()
    return out


def greedy_group(
    scores: np.ndarray, emb: np.ndarray, q: int, *, alpha: float, temperature: float
) -> np.ndarray:
    """The authors' greedy pick of ``q`` of the rows: positions in the order picked (ties to the lower one)."""
    scores = np.asarray(scores, dtype=np.float64)
    emb = np.asarray(emb, dtype=np.float64)
    picked = np.empty(q, dtype=np.int64)
    taken = np.zeros(len(scores), dtype=bool)
    mean_rel = np.zeros(len(scores))
    for i in range(q):
        key = scores if i == 0 else scores * mean_rel
        key = np.where(taken, np.inf, key)
        j = int(np.argmin(key))
        picked[i], taken[j] = j, True
        rel = relationship(emb, emb[j : j + 1], alpha=alpha, temperature=temperature)[:, 0]
        mean_rel = (i * mean_rel + rel) / (i + 1)
    return picked


def quotas(sizes: np.ndarray, k: int) -> np.ndarray:
    """Per cluster, ``k * size / n`` rounded by largest remainders (ties to the lower cluster): sums to k,
    each within 1 of its share and at most its size."""
    sizes = np.asarray(sizes, dtype=np.int64)
    exact = k * sizes / sizes.sum()
    q = np.floor(exact).astype(np.int64)
    rest = k - int(q.sum())
    order = np.lexsort((np.arange(len(sizes)), -(exact - q)))
    q[order[:rest]] += 1
    return np.minimum(q, sizes)


def cluster(emb: np.ndarray, n_clusters: int, *, seed: int, iters: int) -> np.ndarray:
    """Cluster label per row: k-means on the L2-normalised rows (spherical, as the authors' faiss call)."""
    from sklearn.cluster import KMeans

    x = np.asarray(emb, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n_clusters = min(n_clusters, len(x))
    if n_clusters <= 1:
        return np.zeros(len(x), dtype=np.int64)
    km = KMeans(n_clusters=n_clusters, n_init=1, max_iter=iters, random_state=seed, algorithm="lloyd")
    return km.fit_predict(x).astype(np.int64)


@dataclass(frozen=True)
class ClusterGreedyConfig:
    """Options of the 'cluster_greedy' selector (``selector: {kind: cluster_greedy, ...}``)."""

    cluster_size: int = 3000
    """Candidates per cluster on average: a round of n candidates makes max(1, round(n / cluster_size))
    clusters (the authors: 10,000 clusters over 29.5M documents, about 2,950 each)."""
    alpha: float = 1.0
    """Scale of the relationship (the authors' selection: 1)."""
    temperature: float = 1.0
    """Divides the embeddings' dot product in the relationship (the authors' selection: 1)."""
    kmeans_iters: int = 100
    """Lloyd iterations of the k-means (the authors: 100)."""
    shard_size: int | None = None
    """Candidates per shard (see the module): each shard is clustered and picked on its own, spread over the
    ranks, so the k-means grows linearly with the round; None: the whole round as one shard (the authors')."""

    def __post_init__(self) -> None:
        if self.cluster_size < 1 or self.kmeans_iters < 1:
            raise ValueError(
                f"ClusterGreedyConfig needs cluster_size >= 1 and kmeans_iters >= 1, got {self.cluster_size}, "
                f"{self.kmeans_iters}"
            )
        if self.shard_size is not None and self.shard_size < self.cluster_size:
            raise ValueError(
                f"ClusterGreedyConfig.shard_size={self.shard_size} must be at least cluster_size="
                f"{self.cluster_size} (a shard holds whole clusters), or null for one shard"
            )
        if not self.temperature > 0:
            raise ValueError(f"ClusterGreedyConfig.temperature={self.temperature} must be > 0")


Features = np.ndarray | Callable[[np.ndarray], np.ndarray]
"""The candidates' embeddings in candidate order, or a callable giving the rows at given positions (lazy)."""


def shards(n: int, shard_size: int | None, *, seed: int, round_: int) -> list[np.ndarray]:
    """Positions 0..n-1 dealt into ceil(n / shard_size) shards of sizes within one of each other, by a
    permutation seeded by (seed, round); each shard's positions ascending. None: one shard of all."""
    count = shard_count(n, shard_size)
    if count == 1:
        return [np.arange(n)]
    perm = np.random.default_rng([seed, round_, 0x5AAD]).permutation(n)
    return [np.sort(part) for part in np.array_split(perm, count)]


def shard_count(n: int, shard_size: int | None) -> int:
    """Shards of a round of n: ceil(n / shard_size), one without ``shard_size``."""
    return 1 if shard_size is None or n <= shard_size else math.ceil(n / shard_size)


def _scores(scores, pos: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """The scores at ``pos`` (computed there when ``scores`` is a callable), checked one per candidate and
    finite."""
    if not callable(scores):
        return scores[pos]
    out = np.asarray(scores(pos), dtype=np.float64)
    if out.shape != pos.shape:
        raise ValueError(
            f"the scorer's scores gave {len(out)} values for {len(pos)} candidates: it must give one per "
            "candidate, in their order"
        )
    check_selection(candidates[pos], 1, out, needs_scores=True)  # finite, naming the first bad candidate
    return out


def _rows(features: Features, pos: np.ndarray) -> np.ndarray:
    rows = features(pos) if callable(features) else np.asarray(features)[pos]
    if len(rows) != len(pos):
        raise ValueError(
            f"the scorer's features gave {len(rows)} embeddings for {len(pos)} candidates: it must give one per "
            "candidate, in their order"
        )
    return np.asarray(rows, dtype=np.float64)


@SELECTORS.register("cluster_greedy")
@dataclass(frozen=True)
class ClusterGreedySelector(Selector):
    """Group-MATES's cluster-greedy selection (see the module): reads the scores and the candidates'
    embeddings (``needs_features``), which the round's scorer gives with its scores."""

    cluster_size: int = 3000
    alpha: float = 1.0
    temperature: float = 1.0
    kmeans_iters: int = 100
    shard_size: int | None = None
    needs_scores: ClassVar[bool] = True
    needs_features: ClassVar[bool] = True
    lazy_scores: ClassVar[bool] = True
    collective: ClassVar[bool] = True
    Config: ClassVar[type] = ClusterGreedyConfig

    def select(self, candidates, k, *, scores, seed, round_, features=None, group=None) -> np.ndarray:
        return self.select_with_record(candidates, k, scores=scores, features=features, seed=seed,
                                       round_=round_, group=group)[0]  # fmt: skip

    def select_with_record(
        self, candidates, k, *, scores, features: Features | None, seed: int, round_: int, group=None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The selection and what it did (shards, clusters, the largest, picks at positive scores).
        ``scores`` and ``features``: arrays in candidate order, or callables from positions to their rows
        (each shard's embeddings are read, then its scores). ``group``: a process group to spread the shards
        over (collective: every member calls it alike); None: this process does every shard."""
        if callable(scores):
            check_selection(candidates, k, None, needs_scores=False)  # each shard's scores checked as read
        else:
            check_selection(candidates, k, scores, needs_scores=True)
            scores = np.asarray(scores, dtype=np.float64)
        if features is None or (not callable(features) and len(features) != len(candidates)):
            raise ValueError(
                "selector 'cluster_greedy' needs one embedding per candidate (features): use it with a scorer "
                "that gives them (e.g. 'group_mates')"
            )
        candidates = np.asarray(candidates)
        parts = shards(len(candidates), self.shard_size, seed=seed, round_=round_)
        share = quotas(np.array([len(p) for p in parts]), k)
        rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
        mine, failed = {}, None
        try:
            for s in range(rank, len(parts), world):
                pos = parts[s]
                if share[s] == 0:  # nothing to pick here: not embedded
                    mine[s] = (pos[:0], (0, 0, 0))
                    continue
                emb = _rows(features, pos)
                picked, rec = self._shard(_scores(scores, pos, candidates), emb, int(share[s]), seed, round_,
                                          s if len(parts) > 1 else None)  # fmt: skip
                mine[s] = (pos[picked], rec)
        except Exception as e:  # noqa: BLE001 - told to every rank below, then raised
            if world == 1:
                raise
            failed = e
        done = mine
        if world > 1:  # every rank ends with every shard's picks, or every rank raises what one rank raised
            gathered: list = [None] * world
            said = None if failed is None else f"{type(failed).__name__}: {failed}"
            dist.all_gather_object(gathered, (mine, said), group=group)
            errors = [(r, err) for r, (_, err) in enumerate(gathered) if err is not None]
            if errors:  # the failing rank raises its own error's type; the others a RuntimeError
                told = "; ".join(f"rank {r} of the selector's group: {err}" for r, err in errors)
                raise (type(failed) if failed else RuntimeError)(
                    f"the round's selection failed on {told}"
                ) from failed
            done = {s: v for part, _ in gathered for s, v in part.items()}
        picks = np.concatenate([done[s][0] for s in range(len(parts))])
        recs = [done[s][1] for s in range(len(parts))]
        out = np.sort(candidates[picks].astype(np.int32))
        return out, {"shards": len(parts), "clusters": sum(r[0] for r in recs),
                     "largest_cluster": max(r[1] for r in recs),
                     "picks_at_positive_scores": sum(r[2] for r in recs)}  # fmt: skip

    def _shard(
        self, scores: np.ndarray, emb: np.ndarray, k: int, seed: int, round_: int, shard: int | None
    ) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One shard clustered and picked: positions in the shard, and (clusters, largest, positive picks)."""
        return self.pick(scores, emb, self.labels(emb, seed=seed, round_=round_, shard=shard), k)

    def labels(self, emb: np.ndarray, *, seed: int, round_: int, shard: int | None) -> np.ndarray:
        """A shard's k-means clusters (``shard`` None: the round's only shard)."""
        n_clusters = max(1, round(len(emb) / self.cluster_size))
        return cluster(emb, n_clusters, seed=_kmeans_seed(seed, round_, shard), iters=self.kmeans_iters)

    def pick(
        self, scores: np.ndarray, emb: np.ndarray, labels: np.ndarray, k: int
    ) -> tuple[np.ndarray, tuple[int, int, int]]:
        """The greedy picks of a clustered shard (each cluster its quota of k): positions, and (clusters,
        largest, positive picks)."""
        names, sizes = np.unique(labels, return_counts=True)
        chosen, positive = [], 0
        for c, q in zip(names, quotas(sizes, k), strict=True):
            members = np.flatnonzero(labels == c)
            if q == 0:
                continue
            order = greedy_group(scores[members], emb[members], int(q), alpha=self.alpha,
                                 temperature=self.temperature)  # fmt: skip
            picked = members[order]
            positive += int((scores[picked] > 0).sum())
            chosen.append(picked)
        return np.concatenate(chosen), (int(len(names)), int(sizes.max()), positive)


def _kmeans_seed(seed: int, round_: int, shard: int | None = None) -> int:
    """The k-means seed of a round (one shard: the same as before shards existed) or of one of its shards."""
    key = [seed, round_, 0xC1C1] + ([] if shard is None else [shard])
    return int(np.random.default_rng(key).integers(2**31 - 1))

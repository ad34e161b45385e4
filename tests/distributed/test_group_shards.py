"""The sharded cluster-greedy selection spread over real gloo processes: every world size selects the set one
process selects, and each rank embeds and scores only the shards it clusters and picks (Group-MATES's
scorer gives both as callables from positions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch.distributed as dist

from mates_megatron.compat.spawn import run_on_ranks
from mates_megatron.selectors.group import ClusterGreedySelector, shards

pytestmark = pytest.mark.distributed

N, K = 700, 120


def _pool():
    rng = np.random.default_rng(11)
    emb = rng.normal(size=(N, 8))
    return (
        np.arange(N, dtype=np.int32) * 3,
        rng.normal(size=N),
        emb / np.linalg.norm(emb, axis=1, keepdims=True),
    )


def _select(shard_size, spread=True, lazy_scores=True):
    cands, scores, emb = _pool()
    asked, scored = [], []

    def lazy(pos):
        asked.extend(np.asarray(pos).tolist())
        return emb[pos]

    def lazy_score(pos):
        scored.extend(np.asarray(pos).tolist())
        return scores[pos]

    sel = ClusterGreedySelector(cluster_size=60, shard_size=shard_size)
    out, rec = sel.select_with_record(
        cands, K, scores=lazy_score if lazy_scores else scores, features=lazy, seed=9, round_=4,
        group=dist.group.WORLD if spread else None,
    )  # fmt: skip
    return {"out": out.tolist(), "record": rec, "asked": sorted(asked), "scored": sorted(scored)}


@pytest.mark.parametrize(("shard_size", "world"), [(150, 3), (None, 2)])
def test_every_world_size_selects_what_one_process_does_each_rank_embedding_its_shards(shard_size, world):
    alone = _select(shard_size, spread=False)  # this process, no group
    assert len(alone["out"]) == K and alone["asked"] == alone["scored"] == list(range(N))
    dense = _select(shard_size, spread=False, lazy_scores=False)
    assert dense["out"] == alone["out"] and dense["record"] == alone["record"]
    parts = shards(N, shard_size, seed=9, round_=4)
    for r, got in enumerate(run_on_ranks(_select, world, shard_size)):
        assert got["out"] == alone["out"] and got["record"] == alone["record"]
        mine = sorted(i for s in range(r, len(parts), world) for i in parts[s].tolist())
        # rank r embeds and scores shards r, r + world, ... only (one shard: rank 0 alone)
        assert got["asked"] == got["scored"] == mine


def _select_with_a_bad_shard():
    cands, scores, emb = _pool()
    scores = scores.copy()
    part = shards(N, 150, seed=9, round_=4)[1]  # rank 1's first shard (shards 1, 4 on 3 ranks)
    scores[part[3]] = np.nan
    sel = ClusterGreedySelector(cluster_size=60, shard_size=150)
    try:
        sel.select(cands, K, scores=lambda pos: scores[pos], features=lambda pos: emb[pos], seed=9, round_=4,
                   group=dist.group.WORLD)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - what each rank raised is the result
        return type(e).__name__, str(e)
    return None


def test_a_rank_that_fails_its_shard_fails_every_rank_at_once_naming_it():
    """Lazy scores are checked where they are read: a NaN in rank 1's shard raises there, and the other ranks
    raise too, from the all-gather, instead of waiting for picks that never come."""
    cands, _, _ = _pool()
    bad = int(cands[shards(N, 150, seed=9, round_=4)[1][3]])
    got = run_on_ranks(_select_with_a_bad_shard, 3, timeout=120)
    said = (
        f"the round's selection failed on rank 1 of the selector's group: ValueError: 1 candidate scores are NaN "
        f"or infinite (first at candidate id {bad}); fix the scorer before selecting"
    )
    assert got == [("RuntimeError", said), ("ValueError", said), ("RuntimeError", said)]

"""`mates-lab bench gotd-lm` (GOT-D against look-alike on the language model, a target mode the pretraining
mix under-covers): the split, the selections and the continued runs' data. The runs themselves are the bench."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mates_lab.bench.gotd_lm import GotdLmConfig, _prepare, select, split_documents, swap_in_rare


def _domains(seed=0):
    """The embedded pool's domain counts (junk, python_docs, python_code, package_docs, licenses)."""
    counts = [488, 598, 2715, 360, 231]
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(5), counts))


def test_split_is_disjoint_and_skews_both_halves_alike():
    cfg = GotdLmConfig()
    domains = _domains()
    s = split_documents(domains, 3, cfg, seed=2)
    every = np.concatenate([s.target, s.pretrain, s.pool])
    assert len(every) == len(np.unique(every))
    assert len(s.target) == cfg.target_per_mode and np.all(domains[s.target] == 3)
    # Every document of the other domains is in exactly one half; only rare ones are dropped.
    assert np.array_equal(np.sort(every[domains[every] != 3]), np.flatnonzero(domains != 3))
    rare_left = (360 - cfg.target_per_mode) / 2
    for rows in (s.pretrain, s.pool):
        assert np.sum(domains[rows] == 3) == round(cfg.keep_rare * rare_left)
    assert np.abs(np.bincount(domains[s.pretrain]) - np.bincount(domains[s.pool])).max() <= 1  # odd counts
    again = split_documents(domains, 3, cfg, seed=2)
    assert np.array_equal(again.pool, s.pool) and np.array_equal(again.target, s.target)
    assert not np.array_equal(split_documents(domains, 3, cfg, seed=3).pool, s.pool)


def test_split_refuses_a_rare_domain_smaller_than_the_target():
    with pytest.raises(ValueError, match="lower target_per_mode"):
        split_documents(_domains(), 4, GotdLmConfig(target_per_mode=230), seed=0)


def test_gotd_spends_its_budget_on_the_under_covered_mode_lookalike_does_not():
    """Two tight clusters on the unit sphere: the well-covered mode (most of the pool, and half the target)
    and the rare one (a few pool rows, the other half of the target); plus unrelated rows. The target's
    rare half is mostly unmet by the pool, so the transport's gradient favours its few pool rows; the
    nearest-neighbour score favours the many rows of the tighter, well-covered mode."""
    rng = np.random.default_rng(0)
    d = 16
    centres = np.eye(d)[:3]
    spread = {0: 0.15, 1: 0.3, 2: 0.3}  # well-covered mode tight: look-alike's nearest neighbours sit there
    domains = np.array([0] * 300 + [1] * 40 + [2] * 300)  # 0: well, 1: rare, 2: unrelated
    x = np.stack([centres[k] + spread[k] * rng.standard_normal(d) for k in domains])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cfg = GotdLmConfig(target_per_mode=20, keep_rare=0.25, budget_fraction=0.05)
    s = split_documents(domains, 1, cfg, seed=0)
    ref = centres[0] + spread[0] * rng.standard_normal((50, d))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    picked = select(x, ref, s, cfg, seed=0)
    rare = {arm: int(np.sum(domains[rows] == 1)) for arm, rows in picked["chosen"].items()}
    assert all(len(rows) == picked["budget"] for rows in picked["chosen"].values())
    assert all(np.isin(rows, s.pool).all() for rows in picked["chosen"].values())
    # Measured on seeds 0-3 of this setup: GOT-D takes every rare pool row (2 of its 15), look-alike none.
    assert rare["gotd"] == np.sum(domains[s.pool] == 1) == 2 and rare["lookalike"] == 0, rare


def test_swap_in_rare_keeps_the_budget_and_adds_exactly_gotds_rare_picks():
    """The ``lookalike_rare`` arm: look-alike's picks with GOT-D's rare ones swapped in for as many others."""
    domains = np.array([0] * 20 + [1] * 5)
    lookalike = np.array([0, 1, 2, 3, 4, 5, 21])
    gotd = np.array([0, 7, 20, 21, 22, 23, 24])
    got = swap_in_rare(lookalike, gotd, domains, rare=1, seed=3)
    assert len(got) == len(lookalike) and len(np.unique(got)) == len(got)
    assert set(got[domains[got] == 1]) == {20, 21, 22, 23, 24}  # every rare pick of GOT-D's, once
    kept = set(got[domains[got] == 0])
    assert kept < set(lookalike[domains[lookalike] == 0]) and len(kept) == 2  # 4 of its 6 others dropped
    np.testing.assert_array_equal(got, swap_in_rare(lookalike, gotd, domains, rare=1, seed=3))
    # More rare picks than look-alike has other picks: it becomes all rare, still the budget.
    many = swap_in_rare(np.array([0, 20]), np.arange(20, 25), domains, rare=1, seed=0)
    assert len(many) == 2 and (domains[many] == 1).all()


def test_prepare_writes_exactly_the_chosen_documents(small_embedded, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from mates_megatron.pool.webdataset_pool import WebDatasetPool

    pool = WebDatasetPool(small_embedded["dir"] / "train-shards", seq_length=1)
    ids = np.array([3, 17, 400, len(pool) - 1])
    prefix = _prepare(pool, ids, tmp_path / "arm")
    ds = IndexedDataset(str(prefix))
    assert len(ds) == len(ids)
    meta = json.loads((tmp_path / "arm.meta.json").read_text())
    names = [meta["domains"][i] for i in np.load(tmp_path / "arm.domains.npy")]
    assert names == [pool.domains[d] for d in pool.domain_ids(ids)]
    # Each document round-trips: the tokens are the pool's own (eod included).
    for i, gid in enumerate(ids):
        assert np.array_equal(ds[i], pool.tokens(int(gid)))

"""MatesSampler: Megatron's sampler contract, rounds served exactly once, exact resume at any DP size."""

from __future__ import annotations

import numpy as np
import pytest

from mates_megatron.pool.base import PoolError, PoolRounds
from mates_megatron.sampler import MatesSampler
from mates_megatron.selectors import RandomSelector

GBS, MBS, STEPS_PER_ROUND, STEPS = 8, 2, 5, 23
SPR = GBS * STEPS_PER_ROUND
ROUNDS = PoolRounds(num_candidates=1000, candidates_per_round=SPR * 4, seed=9)


def _sampler(dp_rank: int, dp: int, consumed: int = 0) -> MatesSampler:
    return MatesSampler(
        total_samples=STEPS * GBS,
        consumed_samples=consumed,
        micro_batch_size=MBS,
        data_parallel_rank=dp_rank,
        data_parallel_size=dp,
        samples_per_round=SPR,
        seed=4,
        global_batch_size=GBS,
    )


def _selection(round_: int) -> np.ndarray:
    return RandomSelector().select(ROUNDS.candidates(round_), SPR, scores=None, seed=1, round_=round_)


def _reference_sequence() -> list[int]:
    """Plain reference: per round, the selection in the order of rng([seed, round]).permutation."""
    seq: list[int] = []
    for r in range(-(-STEPS // STEPS_PER_ROUND)):
        sel = _selection(r).astype(np.int32)
        seq += sel[np.random.default_rng([4, r]).permutation(SPR)].tolist()
    return seq


def _global_batches(samplers: list[MatesSampler], start_step: int, end_step: int) -> list[list[int]]:
    """Run the steps; per step the global batch in Megatron's order (chunk by chunk, rank by rank)."""
    out = []
    for step in range(start_step, end_step):
        consumed = step * GBS
        for s in samplers:
            r = s.round_of(consumed)
            if r not in s.published_rounds():
                s.publish(r, _selection(r))
        per_rank = [s.micro_batch_indices(consumed) for s in samplers]
        batch: list[int] = []
        for k in range(len(per_rank[0])):
            for rank_batches in per_rank:
                batch += rank_batches[k].tolist()
        out.append(batch)
    return out


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_global_sequence_matches_reference_and_rounds_are_served_exactly_once(dp):
    batches = _global_batches([_sampler(d, dp) for d in range(dp)], 0, STEPS)
    seq = [i for b in batches for i in b]
    assert seq == _reference_sequence()[: STEPS * GBS]
    for r in range(STEPS // STEPS_PER_ROUND):
        served = seq[r * SPR : (r + 1) * SPR]
        assert sorted(served) == sorted(_selection(r).tolist())  # none twice, none skipped


def test_ranks_are_disjoint_and_cover_the_global_batch():
    samplers = [_sampler(d, 2) for d in range(2)]
    for s in samplers:
        s.publish(0, _selection(0))
    a, b = (np.concatenate(s.micro_batch_indices(0)) for s in samplers)
    assert not set(a) & set(b)
    assert sorted(np.concatenate([a, b]).tolist()) == sorted(_reference_sequence()[:GBS])


def test_iter_follows_megatron_pretraining_sampler_order():
    """Megatron's loop: chunks of mbs x dp consecutive positions; rank d takes [d*mbs, (d+1)*mbs)."""
    dp = 2
    ref = _reference_sequence()
    for d in range(dp):
        s = _sampler(d, dp, consumed=GBS * 3)
        for r in range(-(-STEPS // STEPS_PER_ROUND)):
            s.publish(r, _selection(r))
        got = list(s)
        chunk = MBS * dp
        expected = [
            ref[c + d * MBS : c + (d + 1) * MBS] for c in range(GBS * 3, STEPS * GBS - chunk + 1, chunk)
        ]
        assert got == expected


def test_batches_and_published_end_are_the_iteration_that_loaders_share():
    """``__iter__`` is ``batches(consumed_samples)``; ``published_end`` stops a loader before unchosen rounds."""
    dp = 2
    for d in range(dp):
        s = _sampler(d, dp, consumed=GBS)
        assert s.published_end(GBS) == 0  # nothing published: nothing to draw
        s.publish(0, _selection(0))
        s.publish(1, _selection(1))
        assert s.published_end(GBS) == 2 * SPR and s.published_end(SPR) == 2 * SPR
        assert s.published_end(2 * SPR) == 2 * SPR  # round 2 is not chosen yet
        head = list(s.batches(GBS, s.published_end(GBS)))
        assert len(head) == (2 * SPR - GBS) // (MBS * dp)
        with pytest.raises(PoolError, match="round 2 has no published selection"):
            list(s)  # __iter__ runs on to total_samples and reaches round 2
        for r in range(2, -(-STEPS // STEPS_PER_ROUND)):
            s.publish(r, _selection(r))
        assert s.published_end(GBS) == STEPS * GBS  # capped at total_samples
        assert list(s) == list(s.batches(GBS)) and list(s)[: len(head)] == head
        # A stretch that does not start at the beginning gives the same batches as the whole run from there.
        assert list(s.batches(SPR)) == list(s)[(SPR - GBS) // (MBS * dp) :]


def test_publish_takes_no_broadcast_arguments():
    import inspect

    assert list(inspect.signature(MatesSampler.publish).parameters) == ["self", "round_", "selected"]


@pytest.mark.parametrize("stop_step", [2, STEPS_PER_ROUND, STEPS_PER_ROUND + 1, 2 * STEPS_PER_ROUND])
@pytest.mark.parametrize("dp_before, dp_after", [(1, 1), (2, 2), (2, 1), (1, 4)])
def test_resume_from_state_dict_is_bit_identical(stop_step, dp_before, dp_after):
    full = _global_batches([_sampler(d, dp_before) for d in range(dp_before)], 0, STEPS)
    before = [_sampler(d, dp_before) for d in range(dp_before)]
    head = _global_batches(before, 0, stop_step)
    state = before[0].state_dict()
    after = [_sampler(d, dp_after) for d in range(dp_after)]
    for s in after:
        s.load_state_dict(state)
    tail = _global_batches(after, stop_step, STEPS)
    assert head + tail == full
    for step in range(STEPS):
        assert np.array_equal(np.asarray(full[step]), np.asarray((head + tail)[step]))


def test_selection_is_stored_compactly():
    s = _sampler(0, 1)
    s.publish(0, _selection(0))
    assert s.state_dict()["rounds"][0].dtype == np.int32
    assert s.state_dict()["rounds"][0].nbytes / SPR == 4


def test_bad_publish_and_unpublished_round_are_refused():
    s = _sampler(0, 1)
    with pytest.raises(PoolError, match=r"round 0: the selection has 39 ids, the round serves exactly 40"):
        s.publish(0, _selection(0)[:-1])
    dup = _selection(0).copy()
    dup[1] = dup[0]
    with pytest.raises(PoolError, match="duplicate ids"):
        s.publish(0, dup)
    with pytest.raises(PoolError, match="round 0 has no published selection.*publish it before"):
        s.micro_batch_indices(0)


def test_contract_errors():
    with pytest.raises(ValueError, match="drop_last=True"):
        MatesSampler(80, 0, 2, 0, 1, drop_last=False, samples_per_round=40)
    with pytest.raises(ValueError, match="no samples left to consume"):
        MatesSampler(80, 80, 2, 0, 1, samples_per_round=40)
    with pytest.raises(ValueError, match="not a multiple of global_batch_size"):
        MatesSampler(80, 0, 2, 0, 1, samples_per_round=41, global_batch_size=8)
    s = _sampler(0, 1)
    state = s.state_dict()
    state["samples_per_round"] = 16
    with pytest.raises(ValueError, match="samples_per_round=16.*resume with the same select_every"):
        s.load_state_dict(state)


def test_pool_rounds_are_disjoint_and_deterministic():
    seen = np.concatenate([ROUNDS.candidates(r) for r in range(ROUNDS.num_rounds)])
    assert np.unique(seen).size == seen.size
    again = PoolRounds(num_candidates=1000, candidates_per_round=SPR * 4, seed=9)
    assert np.array_equal(again.candidates(3), ROUNDS.candidates(3))
    with pytest.raises(PoolError, match="round 6 is past the pool"):
        ROUNDS.candidates(6)
    with pytest.raises(PoolError, match="the pool is empty"):
        PoolRounds(num_candidates=0, candidates_per_round=1)


def test_bench_sampler_reports_its_figures():
    from mates_lab.bench import bench_sampler

    r = bench_sampler(100_000, micro_batches=50)
    assert r["candidates"] == 100_000 and r["selected"] == 20_000
    assert r["bytes_per_selected"] == 4.0
    assert r["build_seconds"] > 0 and r["next_batch_us"] > 0

"""The influence worker (asynchronous rounds): a real side process that fits and predicts exactly as this
process would from the same RNG state, reports a failed fit with its cause and keeps serving, and refuses a
pool it cannot be given."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from mates_megatron.influence.config import InfluenceConfig, RidgeConfig

pytestmark = [pytest.mark.distributed]

CFG = InfluenceConfig(model="ridge", ridge=RidgeConfig(features="token_embeddings"), predict_batch_size=16)


def _pool(n=96):
    from transformers import AutoTokenizer

    from mates_megatron.bench.rounds import SyntheticTokenPool

    tok = AutoTokenizer.from_pretrained(str(CFG.resolved_path()), local_files_only=True)
    return SyntheticTokenPool(n, 24, tok, seed=4)


def test_worker_scores_bit_for_bit_like_this_process_and_survives_a_bad_fit():
    from mates_megatron.influence.registry import build_influence_model
    from mates_megatron.influence.worker import InfluenceWorker
    from mates_megatron.pool.base import CandidateTexts
    from mates_megatron.runtime.rng import get_host_rng_state

    pool = _pool()
    ids = np.arange(len(pool), dtype=np.int32)[::-1].copy()
    positions = np.arange(0, len(ids), 3)
    scores = np.random.default_rng(0).normal(size=len(positions))
    worker = InfluenceWorker(CFG, pool=pool, device=torch.device("cpu"))
    try:
        bad = scores.copy()
        bad[2] = np.nan
        worker.submit(ids, positions, bad, get_host_rng_state())
        with pytest.raises(RuntimeError, match="1 oracle scores are NaN/inf: fix the probes before fitting"):
            worker.result()
        torch.manual_seed(9)
        rng = get_host_rng_state()
        worker.submit(ids, positions, scores, rng)
        assert worker.busy
        with pytest.raises(RuntimeError, match="a fit is already in flight"):
            worker.submit(ids, positions, scores, rng)
        got, sp, pe, seconds = worker.result()
        state = worker.state_dict()
    finally:
        worker.close()
    assert not worker.process.is_alive()
    model = build_influence_model(CFG)
    want, result = model.fit_predict(CandidateTexts(pool, ids), positions, scores)
    assert got.dtype == np.float32 and np.array_equal(got, want.astype(np.float32))
    assert (sp, pe) == (result.spearman, result.pearson) and seconds > 0
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_pool_that_cannot_reach_the_worker_is_refused_with_the_fix():
    from mates_megatron.influence.worker import InfluenceWorker

    pool = _pool()
    pool.lock = threading.Lock()  # e.g. an open handle: does not pickle
    with pytest.raises(ValueError, match=r"the pool \(SyntheticTokenPool\) cannot be sent to the influence "
                       r"worker process .*set selection.asynchronous: false"):  # fmt: skip
        InfluenceWorker(CFG, pool=pool, device=torch.device("cpu"))


# -- timeouts: every wait names its phase and who did not answer (no test here can hang: each is bounded) --


@pytest.mark.parametrize("present", [0, 1], ids=["host-waits-for-rank-1", "rank-1-finds-no-host"])
def test_a_worker_world_member_that_never_joins_fails_naming_the_phase_and_the_rank(present):
    """One worker of a two-worker world starts; the other never does. Before: the present worker waited in
    the rendezvous for 30 minutes (torch's default) and its training rank on the pipe forever."""
    from mates_megatron.influence.group import InfluenceTimeout
    from mates_megatron.influence.worker import InfluenceWorker, WorkerWorld, worker_address

    world = WorkerWorld(present, (3, 5), worker_address())  # workers of training ranks 3 and 5
    absent = 1 - present
    missing = rf"worker rank {absent} \(the influence worker of training rank {(3, 5)[absent]}\)"
    cfg = dataclasses.replace(CFG, timeout_s=3.0)
    t = time.monotonic()
    with pytest.raises(
        InfluenceTimeout, match=rf"phase 'worker start': {missing}.* did not answer within 3 s"
    ):
        InfluenceWorker(cfg, pool=_pool(), device=torch.device("cpu"), world=world)
    # Spawning and importing take seconds; the wait itself is the configured 3 s.
    assert time.monotonic() - t < 60


def test_a_worker_that_never_answers_fails_naming_the_phase_and_the_worker():
    """A worker stopped (SIGSTOP) before a fit: its training rank gives up after timeout_s plus the grace
    (2 + 10 s) naming the phase and the worker, and kills it. Before: result() waited forever."""
    from mates_megatron.influence.group import InfluenceTimeout
    from mates_megatron.influence.worker import InfluenceWorker
    from mates_megatron.runtime.rng import get_host_rng_state

    pool = _pool()
    ids = np.arange(len(pool), dtype=np.int32)
    positions = np.arange(0, len(ids), 3)
    scores = np.random.default_rng(0).normal(size=len(positions))
    worker = InfluenceWorker(dataclasses.replace(CFG, timeout_s=2.0), pool=pool, device=torch.device("cpu"))
    try:
        os.kill(worker.process.pid, signal.SIGSTOP)
        worker.submit(ids, positions, scores, get_host_rng_state())
        t = time.monotonic()
        pid = worker.process.pid
        with pytest.raises(
            InfluenceTimeout,
            match=rf"phase 'fit/predict': the influence worker \(pid {pid}\) did not answer within 2 s",
        ):
            worker.result()
        assert 12.0 <= time.monotonic() - t < 40
        assert not worker.process.is_alive()  # killed: it would outlive the failed run
    finally:
        worker.process.kill()

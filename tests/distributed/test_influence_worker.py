"""The influence worker (asynchronous rounds): a real side process that fits and predicts exactly as this
process would from the same RNG state, reports a failed fit with its cause and keeps serving, and refuses a
pool it cannot be given."""

from __future__ import annotations

import threading

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

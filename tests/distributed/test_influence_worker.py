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

CFG = InfluenceConfig(
    model="ridge", ridge=RidgeConfig(features="token_embeddings"), predict_batch_size=16, loader_workers=2
)


def _pool(n=96):
    from transformers import AutoTokenizer

    from mates_lab.bench.rounds import SyntheticTokenPool

    tok = AutoTokenizer.from_pretrained(str(CFG.resolved_path()), local_files_only=True)
    return SyntheticTokenPool(n, 24, tok, seed=4)


def test_worker_scores_bit_for_bit_like_this_process_and_survives_a_bad_fit():
    """The worker reads through its own loader workers (before: a daemonic worker, which may not start them);
    this process reads in process."""
    from mates_megatron.influence import build_influence_model
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
    model = build_influence_model(dataclasses.replace(CFG, loader_workers=0))
    want, result = model.fit_predict(CandidateTexts(pool, ids), positions, scores)
    assert got.dtype == np.float32 and np.array_equal(got, want.astype(np.float32))
    assert (sp, pe) == (result.spearman, result.pearson) and seconds > 0
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


_HELD: list = []


def _start_a_worker(pids) -> None:
    """Start an influence worker and return without closing it, its handle still held (as a host's plugin holds
    its scorer to the end): its pipe stays open, so the worker does not see its end."""
    from mates_megatron.influence.worker import InfluenceWorker

    _HELD.append(InfluenceWorker(CFG, pool=_pool(), device=torch.device("cpu")))
    pids.put(_HELD[-1].process.pid)


_EXIT_WITHOUT_CLOSE = """
import multiprocessing, sys
sys.path.insert(0, sys.argv[1])
from test_influence_worker import _start_a_worker

if sys.argv[2] == "main":
    queue = multiprocessing.Queue()
    _start_a_worker(queue)
    print(queue.get(), 0, flush=True)
else:  # a multiprocessing child, as under mp.spawn: it leaves through multiprocessing's exit function
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_start_a_worker, args=(queue,))
    child.start()
    pid = queue.get(timeout=240)
    child.join(90)
    print(pid, child.exitcode, flush=True)
    child.kill()
"""


@pytest.mark.parametrize("where", ["main", "multiprocessing-child"])
def test_a_process_that_exits_without_closing_its_worker_ends_it(where):
    """The worker is not a daemon (it starts loader workers): a training process that exits without close()
    must still end it and not wait for it at exit (the worker waits on its pipe). Before (an atexit handler):
    a training process started by mp.spawn hung at exit."""
    import subprocess
    import sys
    from pathlib import Path

    here = str(Path(__file__).parent)
    done = subprocess.run(
        [sys.executable, "-c", _EXIT_WITHOUT_CLOSE, here, where], capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stderr[-2000:]
    pid, exitcode = done.stdout.split()[-2:]
    assert exitcode == "0", f"the process that started the worker did not exit ({exitcode})"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{pid}"), f"the worker {pid} outlived its training process"


def test_a_pool_that_cannot_reach_the_worker_is_refused_with_the_fix():
    from mates_megatron.influence.worker import InfluenceWorker

    pool = _pool()
    pool.lock = threading.Lock()  # e.g. an open handle: does not pickle
    with pytest.raises(ValueError, match=r"the pool \(SyntheticTokenPool\) cannot be sent to the influence "
                       r"worker process .*set selection.asynchronous: false"):  # fmt: skip
        InfluenceWorker(CFG, pool=pool, device=torch.device("cpu"))


class _ChangedSinceStart:
    """A pool whose copy finds its data changed when it is rebuilt in the worker (as a real pool's identity check
    refuses: tests/unit/test_pool_pickle.py)."""

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        from mates_megatron.pool.base import PoolError

        raise PoolError("shard train-000.tar changed since the run started; restore it or restart the run")


def test_a_pool_that_refuses_to_rebuild_in_the_worker_is_reported_to_the_training_rank():
    """The refusal's own message reaches the training rank (not a worker dead with an exit code)."""
    from mates_megatron.influence.worker import InfluenceWorker

    with pytest.raises(RuntimeError, match=r"(?s)failed during worker start.*PoolError: shard train-000.tar "
                       r"changed since the run started; restore it or restart the run"):  # fmt: skip
        InfluenceWorker(CFG, pool=_ChangedSinceStart(), device=torch.device("cpu"))


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
    # 15 s: the present worker's own spawn and imports count against the same timeout, and on a loaded
    # 2-core machine they took over 3 s (the message then named the present worker, rightly).
    cfg = dataclasses.replace(CFG, timeout_s=15.0)
    t = time.monotonic()
    with pytest.raises(
        InfluenceTimeout, match=rf"phase 'worker start': {missing}.* did not answer within 15 s"
    ):
        InfluenceWorker(cfg, pool=_pool(), device=torch.device("cpu"), world=world)
    assert time.monotonic() - t < 90


@pytest.mark.parametrize("rank", [0, 1], ids=["host-alone", "no-host"])
def test_joining_gives_up_at_its_timeout_not_after_torchs_retries(rank):
    """The join ends within its timeout (plus a little), so a worker reports the missing peer before its
    training rank stops waiting (timeout_s + REPORT_GRACE_S). Before: a client's TCPStore with a 4 s timeout
    retried to about 7 s (15 s took 25 s, past the training rank's patience: CI saw the wrong rank named)."""
    from mates_megatron.influence.group import InfluenceTimeout
    from mates_megatron.influence.worker import WorkerWorld, join_world, worker_address

    world = WorkerWorld(rank, (3, 5), worker_address())
    t = time.monotonic()
    with pytest.raises(
        InfluenceTimeout, match=rf"phase 'worker start': worker rank {1 - rank} .* within 4 s"
    ):
        join_world(world, 4.0)
    assert time.monotonic() - t < 5.5


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


# -- the worker's device (no GPU here: torch.cuda's calls are recorded in this process) ---------------------


def _record_cuda(monkeypatch, calls: list, count: int = 4) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(
        torch.cuda, "set_device", lambda d: calls.append(("set_device", str(torch.device(d))))
    )
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(("set_rng_state", str(device)))
    )
    monkeypatch.setattr(
        torch.cuda,
        "get_rng_state",
        lambda device="cuda": calls.append(("get_rng_state", str(device))) or "st",
    )


def test_the_worker_selects_its_gpu_before_its_rng_state_and_its_model(monkeypatch):
    """The worker's loop (``_serve``, run here in-process) on 'cuda:1': the device is made current before the
    model is built and before the fit's RNG state is set, so ``torch.cuda.set_rng_state`` seeds the GPU the
    model runs on (before: GPU 0's, so asynchronous differed from synchronous with warm_start). The model is
    built on CPU (no GPU here), the call that asked for cuda:1 recorded."""
    import multiprocessing

    import mates_megatron.influence as influence
    from mates_megatron.influence import runner, worker
    from mates_megatron.runtime.rng import get_host_rng_state

    pool = _pool()
    ids = np.arange(len(pool), dtype=np.int32)
    positions = np.arange(0, len(ids), 3)
    scores = np.random.default_rng(0).normal(size=len(positions))
    rng = {**get_host_rng_state(), "cuda": torch.zeros(16, dtype=torch.uint8)}
    calls: list = []
    _record_cuda(monkeypatch, calls)
    build = influence.build_influence_model

    def build_on_cpu(cfg, device=None):
        calls.append(("build", str(device)))
        return build(cfg, device="cpu")

    monkeypatch.setattr(influence, "build_influence_model", build_on_cpu)  # where the worker looks it up
    parent, child = multiprocessing.Pipe()
    job = {"ids": ids, "positions": positions, "scores": scores, "rng": rng, "delay": 0.0}
    parent.send(("fit_predict", job))
    parent.send(("stop", None))
    worker._serve(child, CFG, worker._Pickled(pool), "cuda:1", [], torch.get_num_threads(), None)
    replies = []
    while parent.poll():
        replies.append(parent.recv())
    assert calls == [("set_device", "cuda:1"), ("build", "cuda:1"), ("set_rng_state", "cuda")]
    assert [status for status, _ in replies if status != "phase"] == ["ready", "ok"], replies

    # The training side hands the worker the RNG of the influence device (what a synchronous fit draws from).
    calls.clear()
    monkeypatch.setattr(runner, "build_influence_model", build_on_cpu)
    state = runner.InfluenceRunner(CFG, device="cuda:1")._rng_state()
    assert state["cuda"] == "st" and ("get_rng_state", "cuda:1") in calls


def test_a_worker_world_on_cuda_fits_with_its_accelerator_group(monkeypatch):
    """The worker's loop (in-process, its world's joining and barrier stood in for): with a world of workers
    on CUDA, the fit gets the accelerator group built over that world beside the gloo one (before: gloo only)."""
    import multiprocessing

    import mates_megatron.influence as influence
    from mates_megatron.influence import worker
    from mates_megatron.influence.base import FitResult
    from mates_megatron.runtime.rng import get_host_rng_state

    calls: list = []
    _record_cuda(monkeypatch, calls)
    monkeypatch.setattr(worker, "join_world", lambda world, timeout_s: "gloo world")
    monkeypatch.setattr(worker, "meet", lambda group, **kw: None)
    monkeypatch.setattr(
        worker,
        "accelerator_group",
        lambda ranks, device, timeout_s: calls.append(("accelerator_group", str(device))) or "nccl group",
    )

    class Recorded:
        def fit_predict(self, texts, positions, scores, *, group, device_group):
            calls.append(("fit_predict", group, device_group))
            return np.zeros(len(texts)), FitResult(0.0, 0.0, 0)

    monkeypatch.setattr(influence, "build_influence_model", lambda cfg, device=None: Recorded())
    pool = _pool(12)
    world = worker.WorkerWorld(0, (0, 1), "127.0.0.1:1")
    job = {"ids": np.arange(12), "positions": np.arange(10), "scores": np.arange(10.0), "delay": 0.0}
    job["rng"] = {**get_host_rng_state(), "cuda": torch.zeros(16, dtype=torch.uint8)}
    parent, child = multiprocessing.Pipe()
    parent.send(("fit_predict", job))
    parent.send(("stop", None))
    monkeypatch.setattr(worker.dist, "destroy_process_group", lambda: None)
    worker._serve(child, CFG, worker._Pickled(pool), "cuda:1", [], torch.get_num_threads(), world)
    replies = []
    while parent.poll():
        replies.append(parent.recv())
    assert [status for status, _ in replies if status != "phase"] == ["ready", "ok"], replies
    assert ("accelerator_group", "cuda:1") in calls
    assert ("fit_predict", "gloo world", "nccl group") in calls


def test_a_bare_cuda_device_is_this_ranks_gpu(monkeypatch):
    """'cuda' without an index: the training device's index, else LOCAL_RANK (before: every worker on GPU 0)."""
    from mates_megatron.influence.encoder import resolve_device

    _record_cuda(monkeypatch, [], count=4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("cuda", "cuda:3") == torch.device("cuda:3")
    assert resolve_device("cuda", None) == torch.device("cuda:2")
    assert resolve_device(None, "cuda") == torch.device("cuda:2")
    assert resolve_device("cuda:1", "cuda:3") == torch.device("cuda:1")  # an explicit index is kept
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(
        ValueError, match=r"influence device 'cuda:5' \(from cuda\): this process sees 4 CUDA"
    ):
        resolve_device("cuda", None)

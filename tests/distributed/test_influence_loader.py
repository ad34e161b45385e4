"""The influence stage's loader workers and accelerator groups: candidates are read and tokenised in DataLoader
workers in order, each exactly once, with scores bit for bit those of reading in process; pinned memory and
non-blocking copies when the device is CUDA; the fit's all-reduce on an NCCL group when the device is CUDA.

No GPU here: the CUDA choices (pin_memory, non_blocking, the NCCL group, which group the all-reduce gets) are
checked by recording the calls, with the NCCL group replaced by a gloo one over the same ranks.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from mates_megatron.compat.spawn import run_on_ranks
from mates_megatron.influence.config import FinetuneConfig, InfluenceConfig, RidgeConfig

pytestmark = pytest.mark.distributed


def _digits(items: list[str]) -> torch.Tensor:
    return torch.tensor([int(t) for t in items])


def test_batches_come_in_order_each_exactly_once_whatever_the_worker_count():
    from mates_megatron.influence.loader import batches, spans

    texts = [str(i) for i in range(103)]
    positions = [*spans(3, 100, 7), np.array([], dtype=np.int64), np.array([5, 101, 0, 5])]
    rng = torch.get_rng_state()
    for workers in (0, 2):
        got = list(batches(texts, positions, _digits, workers=workers, device=torch.device("cpu")))
        assert [None if g is None else g.tolist() for g in got] == [list(p) for p in positions[:-2]] + [
            None,
            [5, 101, 0, 5],
        ]
    assert torch.equal(torch.get_rng_state(), rng)  # the loaders drew nothing from the global RNG


def _start_method() -> tuple[str, str]:
    import multiprocessing

    from mates_megatron.influence.loader import make_loader

    loader = make_loader(["a"], [range(1)], list, workers=2, device=torch.device("cpu"), timeout_s=5.0)
    return multiprocessing.get_start_method(), loader.multiprocessing_context.get_start_method()


def test_loader_workers_are_forked_also_in_a_spawned_process():
    """In a spawned process (an influence worker, a test's rank) the default start method is spawn. Before:
    every prediction and fit epoch there started workers that imported torch and transformers and rebuilt the
    pool (about 25 s for 16 candidates on this machine)."""
    default, loader = run_on_ranks(_start_method, 1)[0]
    assert (default, loader) == ("spawn", "fork")


class _Recorded:
    """A batch that records how it is moved to a device (a CUDA move cannot run here)."""

    moves: list = []

    def __init__(self, items) -> None:
        self.items = items

    def to(self, device, *, non_blocking=False):
        _Recorded.moves.append((str(device), non_blocking))
        return self


def test_pinned_memory_and_non_blocking_copies_when_the_device_is_cuda():
    from mates_megatron.influence.loader import batches, make_loader

    def loader(device):
        return make_loader(["a"], [range(1)], list, workers=0, device=torch.device(device), timeout_s=5.0)

    assert loader("cuda:1").pin_memory and not loader("cpu").pin_memory
    _Recorded.moves.clear()
    with warnings.catch_warnings():  # without an accelerator the loader warns that it has nothing to pin into
        warnings.simplefilter("ignore")
        list(batches(["a", "b"], [range(2)], _Recorded, workers=0, device=torch.device("cuda:1")))
    list(batches(["a", "b"], [range(2)], _Recorded, workers=0, device=torch.device("cpu")))
    assert _Recorded.moves == [("cuda:1", True), ("cpu", False)]


def _pool(n: int, seq_length: int):
    from mates_lab.bench.rounds import SyntheticTokenPool
    from mates_megatron.data.tokenizer import load_tokenizer

    return SyntheticTokenPool(n, seq_length, load_tokenizer(InfluenceConfig().resolved_path()), seed=2)


@pytest.mark.parametrize(
    "model,features",
    [("finetune", "encoder"), ("ridge", "encoder"), ("ridge", "token_embeddings")],
)
def test_scores_are_bit_for_bit_the_same_with_0_and_2_loader_workers(model, features):
    """Fit and predict over a pool's decoded text (decoded and tokenised in the workers), uneven batches."""
    from mates_megatron.influence import build_influence_model
    from mates_megatron.pool.base import CandidateTexts

    pool = _pool(45, 40)
    ids = np.arange(len(pool))[::-1].copy()
    positions = np.arange(0, len(ids), 3)
    target = np.random.default_rng(1).normal(size=len(positions))
    out = []
    for workers in (0, 2):
        cfg = InfluenceConfig(
            model=model, max_length=24, max_chunks=2, predict_batch_size=7, loader_workers=workers,
            finetune=FinetuneConfig(epochs=1, batch_size=6), ridge=RidgeConfig(features=features),
        )  # fmt: skip
        torch.manual_seed(5)  # the fit's dropout draws from here: the loader must not draw in between
        scores, result = build_influence_model(cfg).fit_predict(CandidateTexts(pool, ids), positions, target)
        out.append((scores, result.spearman, torch.get_rng_state()))
    (a, sp_a, rng_a), (b, sp_b, rng_b) = out
    assert a.shape == (45,) and np.array_equal(a, b)
    assert sp_a == sp_b or (np.isnan(sp_a) and np.isnan(sp_b))
    assert torch.equal(rng_a, rng_b)


def _fake_cuda(monkeypatch) -> list:
    """CUDA 'available' with 2 devices, and dist.new_group recording its backend and building gloo instead of
    NCCL; returns the record."""
    import torch.distributed as dist

    calls: list = []
    new_group = dist.new_group
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def record(*args, backend=None, **kw):
        calls.append(("new_group", backend))
        return new_group(*args, backend="gloo" if backend == "nccl" else backend, **kw)

    monkeypatch.setattr(dist, "new_group", record)
    return calls


def _groups_chosen(device: str) -> dict:
    import torch.distributed as dist

    from mates_megatron.influence import finetune
    from mates_megatron.influence.base import FitResult
    from mates_megatron.influence.group import accelerator_group
    from mates_megatron.influence.runner import InfluenceRunner

    torch.set_num_threads(1)
    monkeypatch = pytest.MonkeyPatch()
    calls = _fake_cuda(monkeypatch)
    cfg = InfluenceConfig(max_length=16)
    runner = InfluenceRunner(cfg, device=device)  # synchronous, both ranks members
    cached = accelerator_group(None, device, timeout_s=cfg.timeout_s) is runner.device_group
    seen = {}

    def fit_predict(texts, positions, scores, *, group, device_group):
        seen["fit_predict"] = (group is runner.group, device_group is runner.device_group)
        return np.zeros(len(texts)), FitResult(0.0, 0.0, 0)

    runner.model.fit_predict = fit_predict
    runner.score_round(["x"] * 12, np.arange(12), np.arange(12.0))
    # The gradients' all-reduce: on the device group when there is one, else on the gloo group.
    reduced: list = []
    all_reduce = dist.all_reduce
    monkeypatch.setattr(
        dist, "all_reduce", lambda t, group=None: reduced.append(group) or all_reduce(t, group=group)
    )
    net = torch.nn.Linear(3, 1)
    for p in net.parameters():
        p.grad = torch.full_like(p, float(dist.get_rank()))
    finetune._allreduce_mean_grads(net, runner.group, runner.device_group)
    monkeypatch.undo()
    return {
        "new_groups": calls,
        "device_group": runner.device_group is not None,
        "cached": cached,
        "fit_predict": seen["fit_predict"],
        "reduced_on_device_group": [g is runner.device_group and g is not None for g in reduced],
        "mean": net.weight.grad.tolist(),
    }


def test_the_fit_all_reduces_on_an_nccl_group_when_the_device_is_cuda():
    """Before: every fit step's gradients went to host memory and through gloo, also on CUDA."""
    cuda = run_on_ranks(_groups_chosen, 2, "cuda:0")
    cpu = run_on_ranks(_groups_chosen, 2, "cpu")
    for r in cuda:
        assert r["new_groups"] == [("new_group", "gloo"), ("new_group", "nccl")]  # influence group, then NCCL
        assert r["device_group"] and r["cached"] and r["fit_predict"] == (True, True)
        assert r["reduced_on_device_group"] == [True]
        assert r["mean"] == [[0.5, 0.5, 0.5]]
    for r in cpu:
        assert r["new_groups"] == [("new_group", "gloo")]  # no accelerator group on CPU
        assert not r["device_group"] and r["fit_predict"] == (True, True)  # device_group None on both sides
        assert r["reduced_on_device_group"] == [False]
        assert r["mean"] == [[0.5, 0.5, 0.5]]

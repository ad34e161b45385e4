"""The influence stage's loader workers: candidates are read and tokenised in DataLoader workers in order, each
exactly once, with scores bit for bit those of reading in process; pinned memory and non-blocking copies when
the device is CUDA.

No GPU here: the CUDA choices (pin_memory, non_blocking) are checked by recording the calls.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

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
    from mates_megatron.bench.rounds import SyntheticTokenPool
    from mates_megatron.data.tokenizer import load_tokenizer

    return SyntheticTokenPool(n, seq_length, load_tokenizer(InfluenceConfig().resolved_path()), seed=2)


@pytest.mark.parametrize(
    "model,features",
    [("finetune", "encoder"), ("ridge", "encoder"), ("ridge", "token_embeddings")],
)
def test_scores_are_bit_for_bit_the_same_with_0_and_2_loader_workers(model, features):
    """Fit and predict over a pool's decoded text (decoded and tokenised in the workers), uneven batches."""
    from mates_megatron.influence.registry import build_influence_model
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

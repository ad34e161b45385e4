"""The training loop trains from both pool backends through MatesSampler (TP=2, CPU) and resumes exactly."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from mates_megatron.compat.spawn import run_on_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ITERS, EVERY, STOP = 8, 3, 4  # the stop is inside round 1


def _train(data, pool, overrides):
    from mates_megatron.configio import build
    from mates_megatron.training.build import build_trainer
    from mates_megatron.training.loop import TrainConfig

    cfg = {
        "data_prefix": data["prefix"],
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64},
        "parallel": {"tensor_model_parallel_size": 2, "cpu": True},
        "micro_batch_size": 2,
        "global_batch_size": 4,
        "train_iters": ITERS,
        "lr": 3e-3,
        "lr_warmup_iters": 1,
        "log_interval": 100,
        "seed": 5,
        "selection": {
            "pool": pool if pool == "indexed" else {"kind": pool, "shards": data["prefix"] + "-shards"},
            "select_every": EVERY,
            "selection_ratio": 0.25,
            "selector": "random",
            "seed": 11,
            "run_name": "test",
        },
        **overrides,
    }
    trainer = build_trainer(build(TrainConfig, cfg, where="test"))
    served = []
    order = trainer.order
    original = order.micro_batch_indices

    def record(consumed):
        batches = original(consumed)
        served.append(np.concatenate(batches).tolist())
        return batches

    order.micro_batch_indices = record
    history = trainer.train()
    return {"history": history, "served": served, "share": trainer.hooks[0].domain_share}


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


@pytest.mark.parametrize("pool", ["indexed", "webdataset"])
def test_trains_from_pool_through_mates_sampler_and_resumes(small_embedded, tmp_path, pool):
    from pathlib import Path

    shards = Path(small_embedded["prefix"] + "-shards")
    before = _digest(shards)
    full = run_on_ranks(_train, 2, small_embedded, pool, {})
    # TP ranks build their own loaders: they must serve the same sequence.
    assert full[0]["served"] == full[1]["served"]
    served = full[0]["served"]
    per_round = EVERY * 4
    for r in range(ITERS // EVERY):
        ids = [i for step in served[r * EVERY : (r + 1) * EVERY] for i in step]
        assert len(ids) == per_round and len(set(ids)) == per_round  # none served twice in a round
    assert set(full[0]["share"]) == {0, 1, 2}
    assert all(abs(sum(s.values()) - 1) < 1e-9 for s in full[0]["share"].values())

    save = str(tmp_path / "ckpt")
    run_on_ranks(_train, 2, small_embedded, pool, {"save": save, "exit_interval": STOP})
    resumed = run_on_ranks(_train, 2, small_embedded, pool, {"load": save})[-1]
    assert resumed["served"] == served[STOP:]
    assert resumed["history"]["loss"] == full[-1]["history"]["loss"]
    assert full[-1]["history"]["loss"][-1] < full[-1]["history"]["loss"][0]

    # Reweighted in place: the tars are untouched; the selections sit beside them.
    assert _digest(shards) == before
    if pool == "webdataset":
        from mates_megatron.pool.manifest import SelectionStore

        store = SelectionStore(shards, "test")
        assert store.rounds() == [0, 1, 2]
        assert sorted(store.load(1).tolist()) == sorted(i for s in served[EVERY : 2 * EVERY] for i in s)

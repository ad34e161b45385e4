"""Each data-parallel rank builds only its own share of a round's probe batches (DP=2, real training loop):
the estimators index their share of ``samples``, and the MATES scorer reads a probe from the pool only when
it is indexed."""

from __future__ import annotations

import numpy as np
import pytest

from mates_megatron.compat.spawn import run_on_ranks

pytestmark = [pytest.mark.distributed]

PROBES = 12


def _scored_round(data, estimator: str) -> dict:
    import torch.distributed as dist

    from mates_megatron.configio import build
    from mates_megatron.training.build import build_trainer
    from mates_megatron.training.loop import TrainConfig

    cfg = {
        "data_prefix": data["prefix"],
        "reference": data["reference"],
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64},
        "parallel": {"cpu": True},  # TP=1, PP=1 on 2 ranks: DP=2
        "micro_batch_size": 2,
        "global_batch_size": 4,
        "train_iters": 4,
        "lr": 3e-3,
        "lr_warmup_iters": 1,
        "eval_interval": 100,
        "log_interval": 100,
        "seed": 5,
        "selection": {
            "pool": "indexed",
            "select_every": 2,
            "selection_ratio": 0.25,
            "selector": "gumbel",
            "scorer": "mates",
            "seed": 11,
            "warmup_steps": 2,  # round 1 is scored at the end of step 2
            "max_selection_cost": 1000.0,
            "scorer_options": {
                "probe_samples": PROBES,
                "estimator": estimator,
                "min_influence_spearman": -1,
                "influence": {"model": "ridge", "ridge": {"features": "token_embeddings"}},
            },
        },
    }
    trainer = build_trainer(build(TrainConfig, cfg, where="test"))
    (hook,) = trainer.hooks
    scorer, pool = hook.scorer, hook.pool
    read: list[int] = []
    in_probe = [False]
    training_sample = pool.training_sample

    def counted(gid):
        if in_probe[0]:
            read.append(int(gid))
        return training_sample(gid)

    begin = scorer.begin

    def probing(r):
        in_probe[0] = True
        try:
            return begin(r)
        finally:
            in_probe[0] = False

    pool.training_sample, scorer.begin = counted, probing
    trainer.train()
    return {"rank": dist.get_rank(), "read": read, "probed": scorer.oracle[1]["ids"].tolist()}


@pytest.mark.parametrize("estimator", ["linearized", "mirrored"])
def test_each_data_parallel_rank_reads_only_its_share_of_the_probes(small_embedded, estimator):
    """Strided over the 2 replicas, each probe read once (the mirrored estimator indexes each probe twice,
    before and after its reference step). Before: every rank read all 12."""
    ranks = run_on_ranks(_scored_round, 2, small_embedded, estimator)
    probed = ranks[0]["probed"]
    assert len(probed) == PROBES and ranks[1]["probed"] == probed
    for r in ranks:
        assert r["read"] == probed[r["rank"] :: 2], r
    assert sorted(ranks[0]["read"] + ranks[1]["read"]) == sorted(probed)
    assert np.unique(probed).size == PROBES

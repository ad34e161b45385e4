"""The OT scorers inside the training loop (TP=2, CPU): 'gotd' selects from the first round (model-free), both
tensor-parallel ranks select and serve the same data, each round's selection is the top-k of GOT-D's
potentials over that round's candidates, and a run resumed between rounds selects the same next round."""

from __future__ import annotations

import numpy as np
import pytest

from mates_megatron.compat.spawn import run_on_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ITERS, EVERY = 9, 3  # rounds 0, 1, 2: all scored (round 0 before the first step)


def _train(data, overrides):
    from mates_megatron.configio import build
    from mates_megatron.training.build import build_trainer
    from mates_megatron.training.loop import TrainConfig

    cfg = {
        "data_prefix": data["prefix"],
        "reference": data["reference"],
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64},
        "parallel": {"tensor_model_parallel_size": 2, "cpu": True},
        "micro_batch_size": 2,
        "global_batch_size": 4,
        "train_iters": ITERS,
        "lr": 3e-3,
        "lr_warmup_iters": 1,
        "eval_interval": EVERY,
        "log_interval": 100,
        "seed": 5,
        "selection": {
            "pool": "indexed",
            "select_every": EVERY,
            "selection_ratio": 0.25,
            "selector": "topk",
            "scorer": "gotd",
            "seed": 11,
            "warmup_steps": 0,
            "scorer_options": {"max_length": 32},
        },  # fmt: skip
        **overrides,
    }
    trainer = build_trainer(build(TrainConfig, cfg, where="test"))
    (hook,) = trainer.hooks
    published, scores = {}, {}
    publish_fn, score_fn = hook.publish, hook.scorer.score

    def record_published(round_, chosen):
        published[round_] = sorted(np.asarray(chosen).tolist())
        publish_fn(round_, chosen)

    def record_scores(r):
        s = score_fn(r)
        feats = None if s.features is None else s.features.tolist()
        scores[r.round] = (np.asarray(r.candidates).tolist(), s.scores.tolist(), feats)
        return s

    hook.publish, hook.scorer.score = record_published, record_scores
    trainer.train()
    return {"published": published, "scores": scores, "records": hook.records,
            "k": hook.sampler.samples_per_round}  # fmt: skip


@pytest.fixture(scope="module")
def run(small_embedded):
    return run_on_ranks(_train, 2, small_embedded, {})


def test_gotd_round_selects_the_most_negative_potentials_on_every_rank(run):
    rank0, rank1 = run
    assert rank0["published"] == rank1["published"] and rank0["scores"] == rank1["scores"]
    assert sorted(rank0["records"]) == [1, 2]  # round 0 is published before training starts
    for r in (1, 2):
        rec = rank0["records"][r]
        assert rec["sinkhorn_converged"] and rec["sinkhorn_iterations"] >= 1
        ids, s = (np.array(v) for v in rank0["scores"][r][:2])
        want = sorted(ids[np.argsort(s, kind="stable")[: rank0["k"]]].tolist())
        assert rank0["published"][r] == want


def test_gotd_run_resumed_between_rounds_selects_the_same_round(small_embedded, run, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_on_ranks(_train, 2, small_embedded, {"save": ckpt, "save_interval": EVERY, "exit_interval": EVERY})
    resumed = run_on_ranks(_train, 2, small_embedded, {"save": ckpt, "load": ckpt})
    assert resumed[0]["published"][2] == run[0]["published"][2]
    assert resumed[0]["scores"][2] == run[0]["scores"][2]


def test_cluster_greedy_selects_each_round_as_a_set_on_every_rank(small_embedded):
    """Group-MATES's selector on the look-alike scores and the embeddings they came from: both ranks serve
    the same selection, the one the selector gives offline from the round's scores and embeddings."""
    from mates_megatron.selectors.group import ClusterGreedySelector

    sel = {
        "pool": "indexed", "select_every": EVERY, "selection_ratio": 0.25, "seed": 11, "warmup_steps": 0,
        "selector": {"kind": "cluster_greedy", "cluster_size": 8},
        "scorer": {"kind": "lookalike", "max_length": 32},
    }  # fmt: skip
    rank0, rank1 = run_on_ranks(_train, 2, small_embedded, {"selection": sel})
    assert rank0["published"] == rank1["published"] and sorted(rank0["records"]) == [1, 2]
    for r in (1, 2):
        ids, s, f = (np.array(v) for v in rank0["scores"][r])
        want = ClusterGreedySelector(cluster_size=8).select(
            ids, rank0["k"], scores=s, features=f, seed=11, round_=r
        )
        assert rank0["published"][r] == sorted(want.tolist())

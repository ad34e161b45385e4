"""The mixture selector in the project's training loop (2 processes over gloo, DP=2): every round serves
the weights of its schedule entry, and a run stopped, given new weights for later rounds, and resumed trains
bit-identically to one that had the whole schedule from the start."""

from __future__ import annotations

import json

import pytest

from mates_megatron.compat.spawn import run_on_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ITERS, STOP, EVERY = 20, 7, 5
FIRST = {"junk": 0.1, "python_docs": 0.5, "python_code": 0.2, "package_docs": 0.1, "licenses": 0.1}
SECOND = {"junk": 0.3, "python_docs": 0.1, "python_code": 0.2, "package_docs": 0.2, "licenses": 0.2}


def _train(data, weights, overrides):
    from mates_megatron.pretrain import train_config_from_dict
    from mates_megatron.training.build import build_trainer

    cfg = {
        "data_prefix": data["prefix"],
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64},
        "parallel": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "cpu": True},
        "micro_batch_size": 5, "global_batch_size": 10, "train_iters": ITERS, "lr": 3e-3, "lr_warmup_iters": 2,
        "log_interval": 100, "seed": 5,
        "selection": {"pool": "indexed", "select_every": EVERY, "selection_ratio": 0.5, "seed": 3,
                      "selector": {"kind": "mixture", "weights": weights}},
        **overrides,
    }  # fmt: skip
    trainer = build_trainer(train_config_from_dict(cfg))
    history = trainer.train()
    return {**history, "selection": trainer.hooks[0].summary()}


def _schedule(path, *entries):
    path.write_text(json.dumps({"schedule": [{"from_round": r, "weights": w} for r, w in entries]}))
    return str(path)


def test_resume_across_a_weight_change_trains_the_same_batches(small_embedded, tmp_path):
    both = _schedule(tmp_path / "both.json", (0, FIRST), (2, SECOND))
    full = run_on_ranks(_train, 2, small_embedded, both, {})[-1]
    shares = full["selection"]["selected_share_by_domain"]
    for r, share in enumerate(shares):
        # 50 samples a round: every quota is whole, so each round serves its weights exactly.
        assert share == pytest.approx(FIRST if r < 2 else SECOND), r

    # Stopped at step 7 (rounds 0 and 1 drawn) with only the first weights in the file; the change for
    # round 2 on is appended while it is stopped, and the resumed run draws round 2 at step 10 with it.
    path = tmp_path / "live.json"
    _schedule(path, (0, FIRST))
    save = str(tmp_path / "ckpt")
    first = run_on_ranks(_train, 2, small_embedded, str(path), {"save": save, "exit_interval": STOP})[-1]
    assert first["step"] == list(range(1, STOP + 1))
    _schedule(path, (0, FIRST), (2, SECOND))
    resumed = run_on_ranks(_train, 2, small_embedded, str(path), {"load": save})[-1]
    assert resumed["step"] == list(range(1, ITERS + 1))
    assert resumed["loss"] == full["loss"]  # bitwise: the same samples in the same order
    assert resumed["selection"]["selector"]["consumed"] == full["selection"]["selector"]["consumed"]
    assert sum(full["selection"]["selector"]["consumed"].values()) == ITERS * 10

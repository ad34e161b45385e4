"""The README's "Extending" example: a scorer in one file (examples/extending/prefer_domains.py), registered
from ``selection.imports``, runs through a real round of the training loop (megatron-core GPTModel, CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from mates_megatron.compat.spawn import run_on_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "extending"
ITERS, EVERY = 6, 3


def _train(data):
    sys.path.insert(0, str(EXAMPLE))  # as PYTHONPATH=examples/extending would
    from mates_megatron.configio import build
    from mates_megatron.training.build import build_trainer
    from mates_megatron.training.loop import TrainConfig

    cfg = {
        "data_prefix": data["prefix"],
        "model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 64},
        "parallel": {"cpu": True},
        "micro_batch_size": 4,
        "global_batch_size": 4,
        "train_iters": ITERS,
        "lr_warmup_iters": 1,
        "log_interval": 100,
        "seed": 5,
        "selection": {
            "select_every": EVERY,
            "selection_ratio": 0.25,
            "selector": "topk",
            "scorer": "prefer_domains",
            "scorer_options": {"prefer": ["python_docs"]},
            "imports": ["prefer_domains"],
            "seed": 11,
        },
    }
    trainer = build_trainer(build(TrainConfig, cfg, where="test"))
    (hook,) = trainer.hooks
    trainer.train()
    pool, rounds = hook.pool, hook.rounds
    docs = pool.domains.index("python_docs")
    available = {r: int((pool.domain_ids(rounds.candidates(r)) == docs).sum()) for r in range(ITERS // EVERY)}
    return {"share": hook.domain_share, "records": hook.records, "available": available}


def test_a_scorer_in_one_file_runs_through_a_real_round(small_embedded):
    (out,) = run_on_ranks(_train, 1, small_embedded)
    k = EVERY * 4
    # Round 0 is chosen before training (random); round 1 is the scorer's: every preferred candidate first.
    assert sorted(out["records"]) == [1]
    assert out["share"][1]["python_docs"] == pytest.approx(min(1.0, out["available"][1] / k))
    assert out["share"][1]["python_docs"] > out["share"][0]["python_docs"]
    assert out["records"][1]["preferred"] == pytest.approx(out["available"][1] / (k * 4))
    assert np.isfinite(out["records"][1]["seconds"]["score"])


def test_the_readme_shows_the_example_as_it_is():
    readme = (EXAMPLE.parents[1] / "README.md").read_text()
    shown = readme.split("## Extend\n")[1].split("```python\n")[1].split("```")[0]
    code = (EXAMPLE / "prefer_domains.py").read_text().split('"""\n\n', 1)[1]
    assert shown == code

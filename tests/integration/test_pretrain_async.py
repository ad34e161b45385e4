"""Asynchronous rounds under the user's launcher: `mates-megatron pretrain` (torchrun, 2 ranks, TP=2).

torchrun's children inherit ``TORCHELASTIC_USE_AGENT_STORE=True``; influence workers that read it would wait
forever as clients of a store nobody serves. Tests under ``mp.spawn`` cannot see this: this one launches the
README's command once synchronously and once asynchronously with the same probe lead, and compares every
round's published selection (written beside the WebDataset shards).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mates_megatron.compat.spawn import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ITERS, EVERY = 9, 3  # rounds 1 and 2 scored; each probed one step ahead (steps 2 and 5)
# A quiet 2-core machine runs one launch in about 30 s; a hang fails here instead of blocking the suite.
LAUNCH_TIMEOUT_S = 240


def _kill_tree(pid: int) -> None:
    """Kill a launch and every process under it: torchrun starts its ranks in sessions of their own, and a
    rank's influence workers outlive it, so neither a process group nor killing torchrun reaches them all."""
    import psutil

    root = psutil.Process(pid)
    for p in [*root.children(recursive=True), root]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def _launch(data: dict, tmp: Path, run_name: str, asynchronous: bool) -> dict:
    shards = data["prefix"] + "-shards"
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
        "eval_interval": 100,
        "log_interval": 1,
        "seed": 5,
        "selection": {
            "pool": {"kind": "webdataset", "shards": shards},
            "run_name": run_name,
            "select_every": EVERY,
            "selection_ratio": 0.25,
            "selector": {"kind": "gumbel", "temperature": 0.5},
            "scorer": "mates",
            "seed": 11,
            "warmup_steps": EVERY,
            "max_selection_cost": 1000.0,  # toy size: the probes cost many rounds of training
            "probe_lead_steps": 1,
            "asynchronous": asynchronous,
            "scorer_options": {
                "probe_samples": 12,
                "estimator": "linearized",
                "min_influence_spearman": -1,  # select by the scores, however poor the fit of 12 probes
                "influence": {
                    "model": "ridge",
                    "ridge": {"features": "token_embeddings"},
                    "pass_token_ids": True,
                },
            },
        },
    }
    config, metrics = tmp / f"{run_name}.yaml", tmp / f"{run_name}.json"
    config.write_text(yaml.safe_dump(cfg))
    # torchrun reads PET_MASTER_PORT: a free port, so launches beside other tests do not collide.
    env = {**os.environ, "PET_MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "mates-megatron"), "pretrain", "--config", str(config)]
    cmd += ["--metrics-out", str(metrics)]
    log = tmp / f"{run_name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            proc.wait()
            pytest.fail(
                f"{run_name}: not finished in {LAUNCH_TIMEOUT_S} s; its log ends:\n{log.read_text()[-3000:]}"
            )
    assert proc.returncode == 0, log.read_text()[-6000:]
    store = Path(shards) / "mates" / run_name
    selections = {int(p.name[6:11]): np.load(p) for p in sorted(store.glob("round_*.ids.npy"))}
    shutil.rmtree(store)  # the shards directory is shared by the session's tests
    return {"metrics": json.loads(metrics.read_text()), "selections": selections}


def test_asynchronous_pretrain_under_torchrun_selects_what_synchronous_selects(small_embedded, tmp_path):
    sync = _launch(small_embedded, tmp_path, f"sync-{tmp_path.name}", asynchronous=False)
    run = _launch(small_embedded, tmp_path, f"async-{tmp_path.name}", asynchronous=True)
    assert run["metrics"]["step"][-1] == ITERS == sync["metrics"]["step"][-1]
    assert sorted(run["selections"]) == [0, 1, 2] == sorted(sync["selections"])
    for r in (0, 1, 2):
        assert np.array_equal(run["selections"][r], sync["selections"][r]), f"round {r}"
    rounds, sync_rounds = run["metrics"]["selection"]["rounds"], sync["metrics"]["selection"]["rounds"]
    assert [x["round"] for x in rounds] == [1, 2]
    assert [x["influence_spearman"] for x in rounds] == [x["influence_spearman"] for x in sync_rounds]
    assert run["metrics"]["loss"] == sync["metrics"]["loss"]

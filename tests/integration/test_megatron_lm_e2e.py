"""Megatron-LM's own ``pretrain_gpt.py``, patched, with ``--mates``: run, resumed, compared (CPU mode, 2 ranks).

Runs when ``MEGATRON_LM_DIR`` is a Megatron-LM checkout at a supported tag with its patch applied (see
``examples/megatron_lm/README.md``), through ``mates_megatron.integrations.megatron_lm.cpu`` over gloo. Like any
Megatron-LM run it needs ``triton`` importable and the dataset helpers built (``make -C
$MEGATRON_LM_DIR/megatron/core/datasets``, with ``pybind11``). About 2 minutes a layout on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR")
pytestmark = [
    pytest.mark.skipif(not MEGATRON_LM_DIR, reason="set MEGATRON_LM_DIR to a patched Megatron-LM checkout"),
    pytest.mark.distributed,
    pytest.mark.slow,
]

ITERS = 16
SELECTION = {
    "select_every": 4, "selection_ratio": 0.25, "selector": "gumbel", "scorer": "mates", "seed": 11,
    "warmup_steps": 4,
    # A 2-layer, 64-wide model: the probes are many times a round's training FLOPs at this toy scale.
    "max_selection_cost": 1000.0,
    "scorer_options": {
        "probe_samples": 12, "estimator": "linearized",
        "influence": {"model": "ridge", "ridge": {"features": "token_embeddings"}},
    },
}  # fmt: skip
# Megatron-LM's defaults stay on in every layout: --check-for-nan-in-loss-and-grad and the rerun state machine in
# validate_results mode. Under the distributed optimizer a probe's gradient sync reaches check_grads ->
# validate_result, which asserted outside a training step before probes switched the machine off (issue 32).
# bf16 there, as in the target run: with fp32 weights Megatron-LM (0.16.1, 0.19.0) cannot resume the distributed
# optimizer from torch_dist (load_parameter_state_from_dp_reshardable copies into views of the parameters
# outside no_grad).
# The overlapped gradient reduce and parameter gather are on in Megatron-Bridge's recipes (probes switch off the
# reduce that backward hooks start; the snapshot restores the deferred gather).
DISTOPT = ["--use-distributed-optimizer", "--bf16"]
LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "dp2-distopt": DISTOPT,
    "dp2-distopt-overlap": [*DISTOPT, "--overlap-grad-reduce", "--overlap-param-gather"],
}
LOG = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+) \|.*?grad norm: ([0-9.]+) \|")


def _check_checkout() -> Path:
    root = Path(MEGATRON_LM_DIR)
    script = root / "pretrain_gpt.py"
    if not script.is_file() or "add_mates_args" not in script.read_text():
        pytest.fail(f"MEGATRON_LM_DIR={root} is not a Megatron-LM checkout with the MATES patch applied")
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.fail("Megatron-LM's training package imports triton: pip install triton")
    helpers = root / "megatron/core/datasets"
    # Megatron-LM runs this `make` at start-up (rank 0), and a rebuild there fails without pybind11. The module's
    # name comes from the python3-config on PATH; under pyenv, Megatron-LM's .python-version (3.12) picks it.
    if subprocess.run(["make", "-q", "-C", str(helpers)], capture_output=True).returncode != 0:
        pytest.fail(
            f"build Megatron's dataset helpers for this Python first: make -C {helpers}, with this Python's "
            f"python3-config first on PATH (pyenv: PYENV_VERSION={sys.version.split()[0]})"
        )
    return script


def _run(script: Path, data: dict, ckpt: Path, tmp: Path, *extra: str) -> tuple[str, float]:
    from mates_megatron.data.tokenizer import default_tokenizer_path

    (tmp / "mates.json").write_text(json.dumps(SELECTION))
    args = [
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
        "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", str(ITERS), "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "1",
        "--lr-decay-iters", str(ITERS), "--seed", "5",
        # Dropout on: a resume must restore the RNG streams it draws from, not only the weights.
        "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
        "--distributed-backend", "gloo", "--transformer-impl", "local", "--no-persist-layer-norm",
        "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
        "--no-bias-dropout-fusion", "--no-rope-fusion",
        "--data-path", data["prefix"], "--split", "998,1,1", "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", str(default_tokenizer_path()),
        "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "8", "--ckpt-format", "torch_dist",
        "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "0",
        "--mates", "--mates-config", str(tmp / "mates.json"), "--mates-reference", data["reference"],
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(script.parent), os.environ.get("PYTHONPATH", "")]),
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "OMP_NUM_THREADS": "1",
    }
    with socket.socket() as sock:  # a free port for this run's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
    cmd += ["-m", "mates_megatron.integrations.megatron_lm.cpu", str(script), *args, *extra]
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    return log, time.perf_counter() - start


def _losses(log: str) -> dict[int, tuple[str, str]]:
    """(lm loss, grad norm) as Megatron-LM logs them at each iteration."""
    return {int(i): (loss, norm) for i, loss, norm in LOG.findall(log)}


def _tensors(ckpt_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint (model and optimizer), read back into one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{ckpt_dir.parent.name}.pt"
    dcp_to_torch_save(ckpt_dir, out)
    flat: dict[str, torch.Tensor] = {}

    def walk(x, path: str) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}/{k}")
        elif torch.is_tensor(x):
            flat[path] = x

    walk(torch.load(out, weights_only=False), "")
    return flat


def _mates_state(ckpt: Path, iteration: int) -> dict:
    state = torch.load(ckpt / f"iter_{iteration:07d}" / "mates_state.pt", weights_only=False)
    for record in state["hook"]["records"].values():
        record.pop("seconds")  # wall-clock: the only field allowed to differ
    return state


def _assert_same(a, b, path: str = "") -> None:
    import numpy as np

    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path  # e.g. the standard error of a domain probed once
    else:
        assert a == b, path


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_patched_pretrain_gpt_runs_mates_rounds_and_resumes_exactly(layout, small_embedded, tmp_path):
    script = _check_checkout()

    def run(ckpt: str, *extra: str) -> tuple[str, float]:
        return _run(script, small_embedded, tmp_path / ckpt, tmp_path, *LAYOUTS[layout], *extra)

    whole_log, whole_s = run("whole")
    first_log, first_s = run("split", "--exit-interval", "8")
    second_log, second_s = run("split")

    assert re.search(r"check_for_nan_in_loss_and_grad \.+ True", whole_log)
    assert re.search(r"rerun_mode \.+ validate_results", whole_log)
    # Three scored rounds (steps 4, 8, 12) after the warm-up round, each selecting from its own candidates.
    whole = _mates_state(tmp_path / "whole", ITERS)
    assert sorted(whole["hook"]["records"]) == [1, 2, 3]
    assert all(r["candidates"] == 64 and r["probes"] == 12 for r in whole["hook"]["records"].values())
    # The first leg stopped at step 8 with its checkpoint and the MATES state beside it.
    assert (tmp_path / "split" / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)
    assert (tmp_path / "split" / "iter_0000008" / "mates_state.pt").is_file()
    assert max(_losses(first_log)) == 8 and min(_losses(second_log)) == 9
    # Resumed = uninterrupted: the MATES state (selections, sampler, records, influence model), every loss,
    # and every tensor of the final checkpoint, bit for bit.
    _assert_same(_mates_state(tmp_path / "split", ITERS), whole)
    resumed, went_on = {**_losses(first_log), **_losses(second_log)}, _losses(whole_log)
    assert sorted(resumed) == sorted(went_on) == list(range(1, ITERS + 1))
    assert all(resumed[i][1] == went_on[i][1] for i in resumed)  # every gradient norm
    # Every logged loss but one: in CPU mode the loss Megatron-LM logs at the second step after the resume
    # (step 10) has differed in the 2nd-3rd digit while its gradient norm, every later loss and every tensor
    # of the final checkpoint are identical; a reporting artefact, not training (see the issue 14 note).
    assert all(resumed[i][0] == went_on[i][0] for i in resumed if i != 10)
    a = _tensors(tmp_path / "whole" / f"iter_{ITERS:07d}", tmp_path)
    b = _tensors(tmp_path / "split" / f"iter_{ITERS:07d}", tmp_path)
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    print(
        f"\nMegatron-LM e2e (CPU mode, {layout}): {ITERS} steps, rounds {sorted(whole['hook']['records'])}, "
        f"{len(a)} checkpoint tensors equal after resume; wall {whole_s:.0f} s uninterrupted, "
        f"{first_s:.0f} + {second_s:.0f} s split"
    )

"""The GPU acceptance script (tests/gpu/acceptance.py) where CI runs: no GPU.

Without a GPU every stage that needs one is skipped with its reason and the one that does not (the start-up
refusal of CUDA graphs) runs; the probe stage also runs in CPU mode at toy size (``--cpu-dry-run``), so its code
path (bf16 with fp32 mains, the distributed optimizer, overlapped reduce and gather, NaN checks and the rerun
state machine, bit-exact restore of every estimator) is exercised before a GPU is at hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("acceptance.py")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run the script itself")


def _run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "gpu.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True, timeout=600
    )
    assert out.is_file(), run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())


def test_without_a_gpu_each_stage_is_skipped_with_its_reason(tmp_path):
    stages = _run(tmp_path)["stages"]
    assert list(stages) == ["probes", "cuda_graphs", "influence", "resume", "arms", "megatron_lm"]
    for name in ("probes", "influence", "resume", "arms", "megatron_lm"):
        assert stages[name]["skipped"].startswith("no CUDA device on this machine"), name
    refused = stages["cuda_graphs"]["refused_at_start_up"]
    assert refused.startswith("--cuda-graph-impl local with --mates-scorer mates: the RNG tracker then keeps")


@pytest.mark.distributed
def test_the_probe_stage_runs_in_cpu_mode(small_embedded, tmp_path):
    probes = _run(tmp_path, "--cpu-dry-run", "--stages", "probes", "--data", str(small_embedded["dir"]))
    probes = probes["stages"]["probes"]
    assert "error" not in probes, probes.get("error")
    assert probes["rerun_mode"] == probes["rerun_mode_after"] == "validate_results"
    for name in ("oracle", "linearized", "mirrored"):
        assert probes[name]["restores_bit_exactly"], name
        assert probes[name]["probes_per_s"] > 0
    assert set(probes["linearized"]["seconds_per_probe"]) == {
        "forward_backward",
        "optimizer_step",
        "dot",
        "restore",
    }
    assert 0 < probes["snapshot_bytes"] < probes["model_optimizer_bytes"]
    assert -1 <= probes["bf16_update_vs_fp32_main_spearman"] <= 1

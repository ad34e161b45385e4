"""``run_on_ranks``'s ranks die with the process that spawned them: a killed test or benchmark leaves no ranks
behind holding the cores (they did, and had to be killed by hand)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]


def _sleep(out: str) -> None:
    Path(out, f"{dist.get_rank()}.pid").write_text(str(os.getpid()))
    time.sleep(300)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited; its reaper may not have collected it yet


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_ranks_are_killed_when_their_parent_is(tmp_path):
    code = (
        "from mates_megatron.compat.spawn import run_on_ranks\n"
        "from tests.distributed.test_spawn_parent import _sleep\n"
        f"run_on_ranks(_sleep, 2, {str(tmp_path)!r})\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        deadline = time.monotonic() + 180
        while len(list(tmp_path.glob("*.pid"))) < 2:
            assert parent.poll() is None and time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.5)
        pids = [int(p.read_text()) for p in sorted(tmp_path.glob("*.pid"))]
        assert all(_alive(p) for p in pids)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)

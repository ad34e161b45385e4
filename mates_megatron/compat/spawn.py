"""Run a function on N real processes over gloo and collect each rank's return value.

Used by the distributed tests and the benchmarks: rank and world size come from torch.distributed, exactly
as under torchrun, so the code under test is the code a torchrun job runs.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with(parent: int) -> None:
    """On Linux, have the kernel kill this rank when the process that spawned it dies, so a killed test or
    benchmark leaves no ranks behind (they would hold the cores and the rendezvous); elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the call
        os._exit(1)


def _worker(
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    fn: Callable,
    args: tuple,
    cuda: bool = False,
    parent: int | None = None,
) -> None:
    if parent is not None:
        _die_with(parent)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    # Two cores: one intra-op thread per process keeps N processes from oversubscribing the machine.
    torch.set_num_threads(1)
    result: dict[str, Any]
    try:
        if cuda:  # one GPU per rank, NCCL, as torchrun + initialize_parallel set it up
            torch.cuda.set_device(rank % torch.cuda.device_count())
        # A file rendezvous in the run's own directory: a TCP port picked free by the parent can be taken by
        # another job before rank 0 binds it (EADDRINUSE under concurrent test runs). MASTER_PORT stays set for
        # code that reads it.
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"file://{out_dir}/rendezvous",
            rank=rank,
            world_size=world_size,
        )
        result = {"ok": True, "value": fn(*args)}
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        result = {"ok": False, "error": traceback.format_exc()}
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:  # noqa: BLE001
            pass
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def run_on_ranks(
    fn: Callable, world_size: int, *args: Any, timeout: float = 600.0, cuda: bool = False
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` spawned processes with a gloo process group; return the results.

    ``fn`` must be importable (module level). A rank that raises makes this raise with its traceback.
    ``cuda``: each rank on its own GPU with an NCCL process group (benchmarks on a GPU machine).
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, free_port(), out_dir, fn, args, cuda, os.getpid()),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        import time

        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {timeout:.0f} s")
        results = []
        for rank in range(world_size):
            path = Path(out_dir) / f"rank{rank}.pt"
            if not path.exists():
                raise RuntimeError(f"rank {rank} of {fn.__name__} exited without a result")
            r = torch.load(path, weights_only=False)
            if not r["ok"]:
                raise RuntimeError(f"rank {rank} of {fn.__name__} failed:\n{r['error']}")
            results.append(r["value"])
        return results

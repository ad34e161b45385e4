"""The one launcher: ``torchrun`` of a module, of the pretraining entry point on a run config, and a run config
trained once into a directory (the experiment runner the offline tools and the lab share).

A leaf: it imports nothing of the package at module level, so that tools (mixtures, trace) and the lab can reach
it without import circles, and ``cli.py`` stays a sink.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


class RunError(RuntimeError):
    """A run that ``run_config`` could not train: refused, failed, or left without metrics. The message names
    the run and the fix; commands print it as one ``error:`` line. (A ``RuntimeError`` subclass, so callers that
    caught ``RuntimeError`` keep working; other ``RuntimeError``s are bugs and keep their traceback.)"""


Runner = Callable[[Path, list[str]], int]
"""``runner(config, extra_args) -> exit code``: how a run config is trained (default ``launch_pretrain``)."""


def torchrun(module: str, args: list[str], nproc: int) -> int:
    """``torchrun --nproc-per-node nproc -m module args...`` with one share of the cores per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", module, *args]
    print("[mates-megatron] " + " ".join(cmd[1:]), flush=True)
    env = dict(os.environ)
    # One intra-op thread per process: N processes share the machine's cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)


def processes(cfg: dict[str, Any], nproc_per_node: int | None = None) -> int:
    """The processes a run config needs on one node: ``nproc_per_node`` when given, else TP x PP."""
    par = cfg.get("parallel", {}) or {}
    return nproc_per_node or int(par.get("tensor_model_parallel_size", 1)) * int(
        par.get("pipeline_model_parallel_size", 1)
    )


def launch_pretrain(config: Path, rest: list[str], nproc_per_node: int | None = None) -> int:
    """torchrun the pretraining entry point on ``config`` (extra Megatron-style flags in ``rest``)."""
    cfg = yaml.safe_load(Path(config).read_text()) or {}
    return torchrun(
        "mates_megatron.pretrain", ["--config", str(config), *rest], processes(cfg, nproc_per_node)
    )


def run_config(
    cfg: dict[str, Any],
    run_dir: Path,
    *,
    args: list[str] | None = None,
    runner: Runner | None = None,
    keep_checkpoints: bool = True,
) -> dict[str, Any]:
    """Train ``cfg`` once in ``run_dir`` and return its metrics (``run_dir/metrics.json``).

    The config is written to ``run_dir/config.yaml``. A finished run of the same config is not trained again; a
    directory holding another config's run is refused rather than overwritten; an interrupted run resumes from
    its checkpoint when the config saves and loads one. ``keep_checkpoints=False`` deletes ``run_dir/ckpt`` once
    the run has finished (only its metrics are read afterwards).
    """
    run_dir = Path(run_dir)
    path, metrics = run_dir / "config.yaml", run_dir / "metrics.json"
    text = yaml.safe_dump(cfg, sort_keys=False)
    same = path.is_file() and path.read_text() == text
    if same and metrics.is_file():
        print(f"[mates-megatron] {run_dir}: finished before, its metrics are read", flush=True)
        return json.loads(metrics.read_text())
    if not same and (metrics.is_file() or (run_dir / "ckpt").is_dir()):
        raise RunError(
            f"{run_dir} holds a run of another config than the one asked for; remove the directory to train "
            "this one there"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    rc = (runner or launch_pretrain)(path, [*(args or []), "--metrics-out", str(metrics)])
    if rc:
        raise RunError(
            f"the run {path} failed (exit code {rc}); see its output above. Run again to resume it"
        )
    if not metrics.is_file():
        raise RunError(f"the run {path} ended without writing {metrics}")
    if not keep_checkpoints:
        shutil.rmtree(run_dir / "ckpt", ignore_errors=True)
    return json.loads(metrics.read_text())

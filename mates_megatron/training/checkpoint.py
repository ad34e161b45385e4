"""Checkpoints of a Megatron-Core run: one file per model-parallel shard, atomic, exact resume.

Layout (Megatron-LM's legacy layout, so its tooling recognises it):
    SAVE/latest_checkpointed_iteration.txt
    SAVE/iter_0000100/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt     (data-parallel rank 0 of each shard)
    SAVE/iter_0000100/mp_rank_{tp:02d}_{pp:03d}/rng_dp{dp:03d}.pt      (every rank's RNG state)
    SAVE/iter_0000100/mp_rank_{tp:02d}_{pp:03d}/optim_dp{dp:03d}.pt     (distributed optimizer: each rank's shard)
The iteration directory is written under a temporary name and renamed once every rank has written, so a
crash mid-save never leaves a directory that looks complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mates_megatron.runtime.optimizers import megatron_optimizers
from mates_megatron.runtime.rng import get_rng_state, set_rng_state

TRACKER = "latest_checkpointed_iteration.txt"


def _dist_opt_shard_state(optimizer) -> list[dict[str, Any]]:
    """This rank's shard: the inner torch optimizer state and the fp32 main copies of bf16/fp16 params."""
    return [
        {
            "inner": o.optimizer.state_dict(),
            "main": [
                [t.detach().clone() for t in g] for g in getattr(o, "shard_fp32_from_float16_groups", [])
            ],
        }
        for o in megatron_optimizers(optimizer)
    ]


@torch.no_grad()
def _load_dist_opt_shard_state(optimizer, state: list[dict[str, Any]]) -> None:
    for o, st in zip(megatron_optimizers(optimizer), state, strict=True):
        o.optimizer.load_state_dict(st["inner"])
        for group, saved in zip(getattr(o, "shard_fp32_from_float16_groups", []), st["main"], strict=True):
            for t, v in zip(group, saved, strict=True):
                t.copy_(v)


def _layout() -> dict[str, int]:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _shard_name() -> str:
    tp = parallel_state.get_tensor_model_parallel_rank()
    pp = parallel_state.get_pipeline_model_parallel_rank()
    return f"mp_rank_{tp:02d}_{pp:03d}"


def latest_iteration(load_dir: str | Path) -> int | None:
    """The iteration recorded in the tracker file, or None when the directory holds no checkpoint."""
    tracker = Path(load_dir) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker} holds {text!r}, not an iteration number; fix or delete the file")
    return int(text)


def save_checkpoint(
    save_dir: str | Path,
    iteration: int,
    *,
    model_chunks,
    optimizer,
    scheduler,
    extra: dict[str, Any],
    use_distributed_optimizer: bool,
) -> Path:
    """Save every rank's share of the run at `iteration`; collective over the world group."""
    save_dir = Path(save_dir)
    final = save_dir / f"iter_{iteration:07d}"
    tmp = save_dir / f".tmp_iter_{iteration:07d}"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    shard = tmp / _shard_name()
    shard.mkdir(exist_ok=True)
    dp_rank = parallel_state.get_data_parallel_rank()
    if use_distributed_optimizer:
        # Each data-parallel rank keeps its own shard of the optimizer state (exact resume with the same
        # layout). megatron-core's save_parameter_state drops torch Adam's per-parameter "step", which the
        # fallback optimizer (no apex/TE) keeps, so it cannot restore that optimizer.
        torch.save(_dist_opt_shard_state(optimizer), shard / f"optim_dp{dp_rank:03d}.pt")
    if dp_rank == 0:
        state = {
            "iteration": iteration,
            "layout": _layout(),
            "model": [
                chunk.module.state_dict() if hasattr(chunk, "module") else chunk.state_dict()
                for chunk in model_chunks
            ],
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "extra": extra,
        }
        torch.save(state, shard / "model_optim_rng.pt")
    torch.save(get_rng_state(), shard / f"rng_dp{dp_rank:03d}.pt")
    dist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = save_dir / (TRACKER + ".tmp")
        tracker_tmp.write_text(str(iteration))
        os.replace(tracker_tmp, save_dir / TRACKER)
    dist.barrier()
    return final


def load_checkpoint(
    load_dir: str | Path,
    *,
    model_chunks,
    optimizer,
    scheduler,
    use_distributed_optimizer: bool,
    iteration: int | None = None,
) -> tuple[int, dict[str, Any]] | None:
    """Restore the latest (or the given) checkpoint in place; returns (iteration, extra) or None if none."""
    if iteration is None:
        iteration = latest_iteration(load_dir)
        if iteration is None:
            return None
    it_dir = Path(load_dir) / f"iter_{iteration:07d}"
    shard = it_dir / _shard_name()
    path = shard / "model_optim_rng.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the checkpoint in {load_dir} was saved with another tensor/pipeline layout "
            "or is incomplete; resume with the layout it was saved with"
        )
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["layout"] != _layout():
        raise ValueError(
            f"checkpoint {it_dir} was saved with layout {state['layout']}, this run has {_layout()}: "
            "resume with the same TP, PP and DP sizes"
        )
    for chunk, sd in zip(model_chunks, state["model"], strict=True):
        (chunk.module if hasattr(chunk, "module") else chunk).load_state_dict(sd)
    optimizer.load_state_dict(state["optimizer"])
    if use_distributed_optimizer:
        dp_rank = parallel_state.get_data_parallel_rank()
        _load_dist_opt_shard_state(
            optimizer, torch.load(shard / f"optim_dp{dp_rank:03d}.pt", weights_only=False)
        )
    scheduler.load_state_dict(state["scheduler"])
    dp_rank = parallel_state.get_data_parallel_rank()
    set_rng_state(torch.load(shard / f"rng_dp{dp_rank:03d}.pt", map_location="cpu", weights_only=False))
    return iteration, state["extra"]

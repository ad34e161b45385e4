"""Process groups: torch.distributed + megatron-core parallel_state, on CPU (gloo) or GPU (nccl)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state


@dataclass
class ParallelConfig:
    """Model-parallel layout of a run; data-parallel size is what the world size leaves."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel degree (Megatron --tensor-model-parallel-size)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel degree (Megatron --pipeline-model-parallel-size)."""
    cpu: bool = False
    """Run on CPU with gloo in megatron-core CPU mode (compat.cpu); refused where CUDA is available."""

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ParallelConfig.{name} must be >= 1, got {getattr(self, name)}")

    def data_parallel_size(self, world_size: int) -> int:
        mp = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if world_size % mp:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor x pipeline parallel size {mp} "
                f"(TP={self.tensor_model_parallel_size}, PP={self.pipeline_model_parallel_size}); "
                "launch a multiple of TP*PP processes"
            )
        return world_size // mp


def initialize_parallel(cfg: ParallelConfig, seed: int) -> None:
    """Initialise torch.distributed from the torchrun environment and megatron-core's parallel_state.

    In CPU mode, enables ``compat.cpu`` first (it refuses on CUDA machines).
    """
    if cfg.cpu:
        from mates_megatron.compat.cpu import enable_cpu_mode, is_cpu_mode

        if not is_cpu_mode():
            enable_cpu_mode()
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise RuntimeError(
                "torch.distributed environment not set: launch with torchrun "
                "(e.g. `torchrun --nproc-per-node 2 examples/pretrain_gpt.py ...`)"
            )
        backend = "gloo" if cfg.cpu else "nccl"
        if not cfg.cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    cfg.data_parallel_size(dist.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
    )
    from mates_megatron.compat.cpu import model_parallel_seed

    model_parallel_seed(seed)


def initialize_rerun_machine(mode: str) -> None:
    """Megatron's rerun state machine as Megatron-LM's ``initialize_megatron`` sets it up: in ``mode``, saving and
    restoring the model-parallel RNG tracker's states when a step is rerun."""
    from megatron.core import tensor_parallel
    from megatron.core.rerun_state_machine import (
        RerunMode,
        destroy_rerun_state_machine,
        initialize_rerun_state_machine,
    )

    def save() -> dict:
        return {"rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}

    def restore(state: dict) -> None:
        if state["rng_tracker_states"]:
            tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])

    destroy_rerun_state_machine()  # one machine per process; a process may build several runs (bench, tests)
    initialize_rerun_state_machine(state_save_func=save, state_restore_func=restore, mode=RerunMode(mode))


def destroy_parallel() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

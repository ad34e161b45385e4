"""The host protocol: what the round needs of the training job that runs it.

A host is the training job: the project's own Megatron-Core loop (``mates_megatron.training``),
Megatron-LM (``mates_megatron.integrations.megatron_lm``) or Megatron-Bridge, through a callback
(``mates_megatron.integrations.megatron_bridge``). The round never imports a host; each host implements
``Host`` and passes itself to ``MatesHook.on_step_end(host, iteration, metrics)``.
As Megatron-Core injects ``forward_step_func`` instead of importing the training script, the host injects
its live objects here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from mates_megatron.probe.reference import ReferenceSet


@dataclass(frozen=True)
class ProcessGroups:
    """The process groups a probe uses (runtime objects: passed in, never read from a global)."""

    data_parallel: Any
    """The data-parallel group: probe shares are split and their scores gathered over it."""
    data_parallel_rank: int
    data_parallel_size: int
    model_parallel: Any
    """Tensor x pipeline group of this replica: per-shard sums (e.g. a gradient dot product) reduce over it."""
    pipeline_parallel: Any
    """Pipeline group: losses live on the last stage and are shared over it."""
    pipeline_parallel_size: int

    @classmethod
    def from_parallel_state(cls) -> ProcessGroups:
        """The groups of megatron-core's ``parallel_state`` (what both built-in hosts use)."""
        from megatron.core import parallel_state as ps

        return cls(
            data_parallel=ps.get_data_parallel_group(),
            data_parallel_rank=ps.get_data_parallel_rank(),
            data_parallel_size=ps.get_data_parallel_world_size(),
            model_parallel=ps.get_model_parallel_group(),
            pipeline_parallel=ps.get_pipeline_model_parallel_group(),
            pipeline_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        )


@runtime_checkable
class Host(Protocol):
    """What the round reads of the live training job, at a step boundary, on every rank.

    Contract: between ``on_step_end`` calls the round may run forward/backward passes and optimizer steps
    on ``model_chunks`` with ``optimizer``, but leaves them, the scheduler and every RNG bit-identical to
    how it found them (``probe.snapshot.TrainingSnapshot``). It never keeps references across rounds.
    """

    model_chunks: Sequence[torch.nn.Module]
    """The model as the host trains it (DDP-wrapped chunks; one per virtual pipeline stage)."""
    optimizer: Any
    """The host's megatron-core optimizer (its state and learning rate are the probes' too)."""
    scheduler: Any
    """The host's OptimizerParamScheduler."""
    device: torch.device
    """Where the model runs (the influence model runs there too unless configured otherwise)."""
    seq_length: int
    """Training sequence length."""
    micro_batch_size: int
    """Samples per micro-batch (reference batches are cut to it)."""
    distributed_optimizer: bool
    """Whether Adam's state is sharded over data-parallel ranks (probes then run on every replica together)."""
    groups: ProcessGroups
    """The process groups of this rank."""
    forward_backward_func: Callable
    """megatron-core's schedule for this model (``get_forward_backward_func()``); probes run through it."""
    reference: ReferenceSet | None
    """The probe reference set, tokenised with the pretraining tokenizer (None: none configured)."""

    def log_metrics(self, step: int, scalars: dict[str, float]) -> None:
        """Send scalars to the host's logger (TensorBoard, W&B); called on every rank."""
        ...

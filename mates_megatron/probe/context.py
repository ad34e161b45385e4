"""What every pass on the live model shares: the probe context, the scores it returns, and the mechanics of
running outside training (each replica's share, the data-parallel sync switched off, the gather of scores, the
parameters counted once over the model-parallel group). The estimators (``probe.estimators``) and the model-based
tracers (``trace.model_passes``) are written on these.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from mates_megatron.host import ProcessGroups
from mates_megatron.progress import progress as progress_bar
from mates_megatron.runtime.schedule import Batch, evaluate, run_schedule

if TYPE_CHECKING:
    from mates_megatron.host import Host


@dataclass
class ProbeScores:
    scores: np.ndarray
    """float64 per sample, in input order (lower = more useful)."""
    loss_before: float
    """Reference loss of the unchanged model."""
    method: str
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall-clock seconds of this rank's round by phase: 'reference' (loss before, reference gradient) and, summed
    over the probes, 'forward_backward', 'optimizer_step', 'reference_loss', 'dot', 'forward', 'restore'. With
    ``ProbeContext.time_phases`` the device is synchronised at each boundary, so the split is exact on a GPU."""


@dataclass
class ProbeContext:
    """The live training state an estimator probes (runtime objects, not configuration)."""

    model_chunks: Sequence[torch.nn.Module]
    optimizer: object
    scheduler: object
    reference: Sequence[Batch]
    """The whole reference set as micro-batches (every replica evaluates all of it), on the device for the
    round; its rows may be shorter than seq_length (``ReferenceSet.trimmed``)."""
    seq_length: int
    device: torch.device
    groups: ProcessGroups
    distributed_optimizer: bool = False
    micro_batch_size: int = 8
    """Samples per forward pass for estimators that batch their probes (the run's micro-batch size)."""
    forward_backward_func: Callable | None = None
    """megatron-core's schedule (None: ``get_forward_backward_func()``)."""
    show_progress: bool = True
    time_phases: bool = False
    """Synchronise the device at each phase boundary so that ``ProbeScores.seconds`` splits GPU time exactly
    (benchmarks; off in training, where the syncs would cost)."""
    clock: Callable[[], float] = time.perf_counter
    """What ``ProbeScores.seconds`` is read from: wall-clock seconds, or ``time.process_time`` for the CPU
    seconds of the work on a CPU shared with other jobs (``bench round``)."""

    @classmethod
    def from_host(cls, host: Host, reference: Sequence[Batch]) -> ProbeContext:
        """The one construction: the host's live objects and the reference micro-batches to probe against."""
        return cls(
            model_chunks=list(host.model_chunks),
            optimizer=host.optimizer,
            scheduler=host.scheduler,
            # Copied to the device once for the round, not once per pass.
            reference=[{k: v.to(host.device) for k, v in b.items()} for b in reference],
            seq_length=host.seq_length,
            device=host.device,
            groups=host.groups,
            distributed_optimizer=host.distributed_optimizer,
            micro_batch_size=host.micro_batch_size,
            forward_backward_func=host.forward_backward_func,
        )

    def run(self, micro_batches: Sequence[Batch], *, forward_only: bool) -> torch.Tensor:
        """[loss_sum, tokens] of this replica over ``micro_batches`` (forward and, unless forward_only, backward).

        Outside a training step: run it inside ``runtime.rerun.outside_training_step`` (estimators do, for the
        whole round), or a gradient sync's NaN check asserts.
        """
        return run_schedule(
            self.model_chunks,
            micro_batches,
            seq_length=width(micro_batches, self.seq_length),
            forward_only=forward_only,
            device=self.device,
            forward_backward_func=self.forward_backward_func,
        )


def width(micro_batches: Sequence[Batch], default: int) -> int:
    """The rows' length of one schedule call (pipeline stages exchange tensors of this shape)."""
    return int(micro_batches[0]["tokens"].shape[1]) if micro_batches else default


def _no_sync(*args, **kwargs) -> None:
    return None


@contextlib.contextmanager
def replica_local_grads(ctx: ProbeContext, *, always: bool = False) -> Iterator[None]:
    """Switch off the data-parallel gradient sync (each replica steps on its own sample).

    Both ends: each DDP chunk's ``finish_grad_sync`` (called after the last micro-batch) and each bucket group's
    ``start_grad_sync`` (called from backward hooks under ``overlap_grad_reduce``, which would otherwise average
    the replicas' different probe gradients, or write into a buffer that is being read). Under the distributed
    optimizer a probe step needs the reduce-scatter (Adam's state is sharded), so the sync stays on unless
    ``always`` (for gradients that are read, not stepped on).
    """
    if ctx.distributed_optimizer and not always:
        yield
        return
    targets = [(c, "finish_grad_sync") for c in ctx.model_chunks if hasattr(c, "finish_grad_sync")]
    for c in ctx.model_chunks:
        for g in list(getattr(c, "bucket_groups", [])) + list(
            getattr(c, "expert_parallel_bucket_groups", [])
        ):
            targets.append((g, "start_grad_sync"))
    saved = [(obj, name, obj.__dict__.get(name)) for obj, name in targets]
    for obj, name, _ in saved:
        setattr(obj, name, _no_sync)
    try:
        yield
    finally:
        for obj, name, old in saved:
            if old is None:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


def replica_share(n: int, ctx: ProbeContext, *, together: bool | None = None) -> np.ndarray:
    """This replica's samples: a strided share, or all of them when the replicas probe ``together`` (default:
    under the distributed optimizer, whose sharded Adam state needs every replica in each probe step)."""
    if ctx.distributed_optimizer if together is None else together:
        return np.arange(n)
    return np.arange(ctx.groups.data_parallel_rank, n, ctx.groups.data_parallel_size)


def gather_scores(
    values: dict[int, float], n: int, ctx: ProbeContext, *, together: bool | None = None
) -> np.ndarray:
    """Every replica fills its share; a sum over the data-parallel group assembles all (one writer each)."""
    out = torch.zeros(n, dtype=torch.float64, device=ctx.device)
    for i, v in values.items():
        out[i] = v
    if (
        not (ctx.distributed_optimizer if together is None else together)
        and ctx.groups.data_parallel_size > 1
    ):
        dist.all_reduce(out, group=ctx.groups.data_parallel)
    return out.cpu().numpy()


def progress(items, ctx: ProbeContext, desc: str):
    show = ctx.show_progress and (not dist.is_initialized() or dist.get_rank() == 0)
    return progress_bar(items, desc=desc, unit="probe", leave=False, disable=not show)


def zero_grads(ctx: ProbeContext) -> None:
    for c in ctx.model_chunks:
        if hasattr(c, "zero_grad_buffer"):
            c.zero_grad_buffer()
    ctx.optimizer.zero_grad()


def reference_loss(ctx: ProbeContext) -> float:
    return evaluate(
        ctx.model_chunks,
        ctx.reference,
        seq_length=width(ctx.reference, ctx.seq_length),
        device=ctx.device,
        over_data_parallel=False,
        forward_backward_func=ctx.forward_backward_func,
    )


def param_grad(p: torch.nn.Parameter) -> torch.Tensor | None:
    """The gradient accumulated for ``p``: megatron-core DDP's ``main_grad`` when it has one, else ``grad``."""
    return p.main_grad if getattr(p, "main_grad", None) is not None else p.grad


def counted_params(ctx: ProbeContext) -> list[torch.nn.Parameter]:
    """Parameters counted once across the model-parallel group (no TP duplicates, tied weights once)."""
    return [
        p
        for c in ctx.model_chunks
        for p in c.parameters()
        if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)
    ]

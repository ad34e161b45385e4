"""Data influence on the live, sharded model: the exact locally probed oracle and two cheaper estimators.

One interface, registered by name in ``ESTIMATORS``: ``Estimator.score(samples) -> ProbeScores``, scores
gathered to every rank in the order of ``samples``, lower is more useful. The base class owns what every
estimator shares: the snapshot and restore-on-raise (the run is left exactly as it was found), the
reference loss before, each data-parallel replica's share of the samples and the gather; a subclass writes
only ``probe(sample)`` (or, for estimators that batch their work, ``probe_share``).

- ``OracleProber`` (MATES): one optimizer step on x alone with the run's own optimizer, then the mean
  reference loss; score = that loss.
- ``LinearizedProber``: score = loss_before + <grad of the reference loss, the update the run's optimizer
  applies for x> (the first-order form of the oracle). The update is the optimizer's real step, so Adam's
  moments, bias correction, clipping and weight decay are exact; only the reference forward per probe goes.
  The update is read from the optimizer's fp32 main copies (this rank's shard under the distributed
  optimizer), not from bf16 parameters, where a one-sample update is a fraction of an ulp.
- ``MirroredProber`` (Forward-INF, Ko et al. 2024): one optimizer step on the reference set, then
  score(x) = loss_x(after) - loss_x(before), forward passes only, several candidates per pass.
- ``ForwardProber`` (``probe.forward``): the linearized oracle by forward passes only: each candidate's loss
  derivative along the reference gradient preconditioned by Adam's second moment, batched.

Each data-parallel replica probes its strided share of the samples with its own TP/PP shards. During a
probe, the replicas must not average gradients, so DDP's data-parallel gradient sync is switched off (also the
one backward hooks start under ``overlap_grad_reduce``; tensor- and pipeline-parallel reductions still run).
The distributed optimizer shards Adam's state over data-parallel ranks, so there the replicas probe every sample
together instead. A round holds one ``TrainingSnapshot`` (the estimators share it); Megatron's rerun state
machine is off for probe passes (``runtime.rerun``), as for Megatron-LM's evaluate().
"""

from __future__ import annotations

import contextlib
from abc import ABC
from collections.abc import Iterator, Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist

from mates_megatron.component import Component
from mates_megatron.probe.context import (
    ProbeContext,
    ProbeScores,
    counted_params,
    gather_scores,
    param_grad,
    progress,
    reference_loss,
    replica_local_grads,
    replica_share,
    width,
    zero_grads,
)
from mates_megatron.probe.snapshot import TrainingSnapshot
from mates_megatron.registry import Registry
from mates_megatron.runtime.optimizers import main_params
from mates_megatron.runtime.rerun import outside_training_step
from mates_megatron.runtime.schedule import Batch, eval_mode, per_sample_losses, token_mean_backward

# -- estimators -------------------------------------------------------------------------------------------


class Estimator(Component, ABC):
    """Scores probe samples on the live model; the base class owns snapshot, share, gather and restore.

    Contract for subclasses: ``probe(sample) -> float`` may change the model and optimizer freely (one
    optimizer step, say); the base restores them after every probe, also when it raises. Estimators whose
    work batches over samples override ``probe_share(samples, mine) -> {index: score}`` instead and restore
    themselves with ``self.snapshot.restore()``. ``prepare()`` runs once per round before the probes. The
    round's one snapshot (``self.snapshot``) exists only inside ``score``. ``samples`` is indexed only at this
    rank's share (a lazy sequence builds only those).
    """

    method: ClassVar[str]
    sync_grads: ClassVar[bool] = False
    """Keep the data-parallel gradient sync during probes (every replica steps on the same data)."""
    steps_optimizer: ClassVar[bool] = True
    """A probe steps the run's optimizer: under the distributed optimizer (Adam's state sharded over the
    replicas) every replica then takes part in every probe. Forward-only estimators split the samples."""

    def __init__(self, ctx: ProbeContext) -> None:
        self.ctx = ctx
        self.snapshot: TrainingSnapshot | None = None
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the block's seconds (``ctx.clock``) to ``self.seconds[name]`` (device-synchronised if asked)."""
        sync = self.ctx.time_phases and self.ctx.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.ctx.device)
        clock = self.ctx.clock
        t = clock()
        try:
            yield
        finally:
            if sync:
                torch.cuda.synchronize(self.ctx.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + clock() - t

    def prepare(self) -> None:
        """Per-round work before the probes (e.g. a reference gradient); the run is restored after it."""
        return None

    def reference_loss_before(self) -> float:
        return reference_loss(self.ctx)

    def probe(self, sample: Batch) -> float:
        raise TypeError(f"{type(self).__name__} must implement probe(sample) or probe_share(samples, mine)")

    def step_on(self, sample: Batch) -> None:
        """One step of the run's optimizer (its state, lr, clipping, weight decay) on one sample."""
        ctx = self.ctx
        with self.phase("forward_backward"):
            zero_grads(ctx)
            ctx.run([sample], forward_only=False)
        with self.phase("optimizer_step"):
            ctx.optimizer.step()

    def restore(self) -> None:
        assert self.snapshot is not None
        with self.phase("restore"):
            self.snapshot.restore()

    def probe_share(self, samples: Sequence[Batch], mine: np.ndarray) -> dict[int, float]:
        values: dict[int, float] = {}
        for i in progress(mine, self.ctx, f"{self.method} probes"):
            try:
                values[int(i)] = self.probe(samples[i])
            finally:
                self.restore()
        return values

    def score(self, samples: Sequence[Batch]) -> ProbeScores:
        # A round is never part of a training step: Megatron's rerun state machine is off for it, as for
        # Megatron-LM's evaluate() (runtime.rerun), or a gradient sync's NaN check would assert.
        with outside_training_step():
            return self._score(samples)

    def _score(self, samples: Sequence[Batch]) -> ProbeScores:
        ctx = self.ctx
        self.seconds = {}
        together = ctx.distributed_optimizer and self.steps_optimizer
        self.snapshot = TrainingSnapshot(ctx.model_chunks, ctx.optimizer, ctx.scheduler)
        try:
            with self.phase("reference"):
                before = self.reference_loss_before()
                self.prepare()
            mine = replica_share(len(samples), ctx, together=together)
            if self.sync_grads:
                values = self.probe_share(samples, mine)
            else:
                with replica_local_grads(ctx):
                    values = self.probe_share(samples, mine)
        finally:
            self.snapshot.restore()
            self.snapshot = None  # the round's copy of the model and optimizer goes with the round
        scores = gather_scores(values, len(samples), ctx, together=together)
        return ProbeScores(scores, before, self.method, dict(self.seconds))


ESTIMATORS: Registry[type[Estimator]] = Registry("estimator", base=Estimator)


def batched_losses(
    ctx: ProbeContext, samples: Sequence[Batch], idx: np.ndarray, micro_batch_size: int
) -> torch.Tensor:
    """Each of ``samples[idx]``'s own mean loss, ``micro_batch_size`` samples per forward pass (the last batch
    padded with repeats of its last sample), in eval mode; float64, on the device."""
    if len(idx) == 0:
        return torch.zeros(0, dtype=torch.float64, device=ctx.device)
    rows = [samples[int(i)] for i in idx]
    rows = rows + [rows[-1]] * (-len(rows) % micro_batch_size)
    batches = [
        {k: torch.cat([r[k] for r in rows[j : j + micro_batch_size]]) for k in rows[0]}
        for j in range(0, len(rows), micro_batch_size)
    ]
    return per_sample_losses(
        ctx.model_chunks,
        batches,
        seq_length=ctx.seq_length,
        device=ctx.device,
        forward_backward_func=ctx.forward_backward_func,
    )[: len(idx)]


_DOT_CHUNK = 1 << 22
"""Elements per chunk of the linearized estimator's update dot (16 MB of fp32 temporary)."""


@ESTIMATORS.register("oracle")
class OracleProber(Estimator):
    """The paper's locally probed oracle, with in-memory snapshot/restore instead of checkpoint reloads."""

    method = "oracle"

    def probe(self, sample: Batch) -> float:
        self.step_on(sample)
        with self.phase("reference_loss"):
            return reference_loss(self.ctx)


@ESTIMATORS.register("linearized")
class LinearizedProber(Estimator):
    """score(x) = loss_before + <g_ref, Δθ(x)>, Δθ(x) the run's optimizer update for x alone, read from the
    optimizer's fp32 main copies (this rank's shard under the distributed optimizer)."""

    method = "linearized"

    def reference_loss_before(self) -> float:
        # The reference pass of the gradient gives the loss too: one pass, not two.
        self._before, self._terms = self.reference_gradient()
        return self._before

    def reference_gradient(self) -> tuple[float, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """Reference loss (token mean) and, for every main tensor the optimizer steps, (the reference gradient's
        matching fp32 slice, the live main tensor, its value in the round's snapshot), all flattened. One
        backward pass over the reference set per round, in eval mode (no dropout, like the oracle's loss);
        the gradient is read whole on each replica, and the run is restored after.
        """
        ctx = self.ctx
        assert self.snapshot is not None, "reference_gradient runs inside score(), on the round's snapshot"
        with replica_local_grads(ctx, always=True), eval_mode(ctx.model_chunks):
            zero_grads(ctx)
            total = token_mean_backward(
                ctx.model_chunks,
                ctx.reference,
                seq_length=width(ctx.reference, ctx.seq_length),
                device=ctx.device,
                forward_backward_func=ctx.forward_backward_func,
            )
        counted = {id(p) for p in counted_params(ctx)}
        terms = []
        for p, main, offset in main_params(ctx.optimizer):
            if id(p) not in counted:  # TP duplicates and tied weights: counted on one rank only
                continue
            g = param_grad(p).detach().reshape(-1)[offset : offset + main.numel()]
            terms.append((g.float().clone(), main.detach().view(-1), self.snapshot.saved(main).view(-1)))
        self.snapshot.restore()
        if ctx.groups.pipeline_parallel_size > 1:
            dist.all_reduce(total, group=ctx.groups.pipeline_parallel)
        return float(total[0] / total[1]), terms

    def _update_dot(self) -> float:
        ctx = self.ctx
        dot = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for g, live, saved in self._terms:
            # fp32 dot of the update, one parameter (or shard) at a time, in chunks: the temporary difference
            # stays small whatever the parameter (a 50k x 8k embedding is 1.6 GB in fp32).
            for i in range(0, g.numel(), _DOT_CHUNK):
                j = i + _DOT_CHUNK
                dot += torch.dot(g[i:j], live[i:j] - saved[i:j])
        if dist.get_world_size(ctx.groups.model_parallel) > 1:  # sum the shards' parts over TP x PP
            dist.all_reduce(dot, group=ctx.groups.model_parallel)
        if ctx.distributed_optimizer and ctx.groups.data_parallel_size > 1:  # and over the optimizer shards
            dist.all_reduce(dot, group=ctx.groups.data_parallel)
        return float(dot)

    def probe(self, sample: Batch) -> float:
        self.step_on(sample)
        with self.phase("dot"):
            return self._before + self._update_dot()


@ESTIMATORS.register("mirrored")
class MirroredProber(Estimator):
    """One optimizer step on the reference set; score(x) = change of x's own loss (forward passes only)."""

    method = "mirrored"
    # Replicas score different candidates but take the same reference step (the DP average of identical
    # gradients is that gradient), so the data-parallel sync stays on here.
    sync_grads = True

    def __init__(self, ctx: ProbeContext, *, micro_batch_size: int = 8, steps: int = 1) -> None:
        super().__init__(ctx)
        self.micro_batch_size, self.steps = micro_batch_size, steps

    def _losses(self, samples: Sequence[Batch], idx: np.ndarray) -> torch.Tensor:
        with self.phase("forward"):
            return batched_losses(self.ctx, samples, idx, self.micro_batch_size)

    def probe_share(self, samples: Sequence[Batch], mine: np.ndarray) -> dict[int, float]:
        ctx = self.ctx
        loss0 = self._losses(samples, mine)
        for _ in range(self.steps):
            with self.phase("forward_backward"):
                zero_grads(ctx)
                ctx.run(ctx.reference, forward_only=False)
            with self.phase("optimizer_step"):
                ctx.optimizer.step()
        loss1 = self._losses(samples, mine)
        return {int(i): float(d) for i, d in zip(mine, (loss1 - loss0).tolist(), strict=True)}

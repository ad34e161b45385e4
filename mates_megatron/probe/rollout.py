"""Group-MATES's rollout oracle (Yu et al. 2025; ``group-mates/oracle/rollout_train.py``) as an estimator.

The probe samples are read as consecutive rollouts of ``rollout_length`` samples (the last may be shorter).
A rollout starts from the round's model and optimizer, takes one step of the run's optimizer on each of its
samples in order, and reads the reference loss after each step; a sample's score is the change its step made
(the loss after it minus the loss before it), so it is the sample's influence *given* the samples before it
in its rollout. The run is restored after each rollout. The authors record the cumulative change after each
of 10 steps and train on its differences: the same numbers.

A rollout's first sample scores what the 'oracle' estimator scores minus the loss before (one step from the
round's state); the rest are what no single-sample oracle sees. Cost: a step and a reference pass per sample,
as 'oracle', with one restore per rollout instead of per sample. Data-parallel replicas split the rollouts
(whole rollouts, strided); under the distributed optimizer every replica takes part in every step.

'linearized_rollout' is the same rollouts read to first order, as 'linearized' reads the oracle: one reference
gradient g at the round's weights, and each step scored by <g, θ_i - θ_(i-1)>, the run's update for that sample
given the steps before it. It keeps what the rollout changes through the optimizer (Adam's moments carry the
earlier samples into each step, and the weights have moved), and drops the curvature between the steps (the
reference gradient is not recomputed as the rollout moves). Cost: 'linearized''s, with one restore per rollout
instead of per probe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mates_megatron.probe.context import progress, reference_loss
from mates_megatron.probe.estimators import ESTIMATORS, Estimator, LinearizedProber
from mates_megatron.runtime.schedule import Batch

ROLLOUT_LENGTH = 10
"""Samples per rollout (the authors' ``num_rollouts``: 10 steps)."""


@ESTIMATORS.register("rollout")
class RolloutProber(Estimator):
    """Scores each probe sample by its step's reference-loss change inside its rollout (see the module)."""

    method = "rollout"

    def __init__(self, ctx, *, rollout_length: int = ROLLOUT_LENGTH) -> None:
        if rollout_length < 1:
            raise ValueError(f"rollout_length={rollout_length} must be >= 1")
        super().__init__(ctx)
        self.rollout_length = rollout_length
        self._before = math.nan

    def reference_loss_before(self) -> float:
        self._before = reference_loss(self.ctx)
        return self._before

    def rollouts(self, n: int) -> list[range]:
        """This replica's rollouts over ``n`` probe samples: whole rollouts, strided over the replicas (all of
        them when the replicas step together)."""
        r = self.rollout_length
        every = [range(i, min(n, i + r)) for i in range(0, n, r)]
        g = self.ctx.groups
        if self.ctx.distributed_optimizer or g.data_parallel_size == 1:
            return every
        return every[g.data_parallel_rank :: g.data_parallel_size]

    def probe_share(self, samples: Sequence[Batch], mine: np.ndarray) -> dict[int, float]:
        values: dict[int, float] = {}
        for rollout in progress(self.rollouts(len(samples)), self.ctx, "rollouts"):
            before = self._before
            try:
                for i in rollout:
                    self.step_on(samples[i])
                    with self.phase("reference_loss"):
                        after = reference_loss(self.ctx)
                    values[i], before = after - before, after
            finally:
                self.restore()
        return values


@ESTIMATORS.register("linearized_rollout")
class LinearizedRolloutProber(RolloutProber, LinearizedProber):
    """Each rollout step scored by the reference gradient at the round's weights dotted with its update (see the
    module); what 'rollout' scores, to first order."""

    method = "linearized_rollout"

    def reference_loss_before(self) -> float:
        return LinearizedProber.reference_loss_before(self)

    def probe_share(self, samples: Sequence[Batch], mine: np.ndarray) -> dict[int, float]:
        values: dict[int, float] = {}
        for rollout in progress(self.rollouts(len(samples)), self.ctx, "linearized rollouts"):
            moved = 0.0  # <g, θ_i - θ_0>: the dot reads the live weights against the round's snapshot
            try:
                for i in rollout:
                    self.step_on(samples[i])
                    with self.phase("dot"):
                        now = self._update_dot()
                    values[i], moved = now - moved, now
            finally:
                self.restore()
        return values

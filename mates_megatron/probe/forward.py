"""The linearized oracle by forward passes only: every probe of a round scored by batched forward passes.

The oracle's score is the reference loss after one step of the run's Adam on the sample alone. To first order
its sample-specific part is the sample's loss gradient along one direction fixed for the round,

    score(x) = loss_ref(θ) + <g_ref, u0> - c(x) · <∇loss_x(θ), d>,    d = lr (1 - β1) / bc1 · g_ref / (√(β2 v / bc2) + ε),

with ``g_ref`` the reference gradient, ``v`` Adam's second moment, bc1/bc2 the next step's bias corrections,
``u0`` the part of the update no sample changes (momentum and weight decay) and ``c(x)`` the clipping factor
``min(1, clip_grad / ||∇loss_x||)``. ``<∇loss_x, d>`` is the directional derivative of x's own loss along d: a
central difference, (loss_x(θ + s d) - loss_x(θ - s d)) / 2s, needs two forward passes of every candidate
batch and nothing per probe (the mirrored form of Ko et al. 2024, Forward-INF, aimed at the oracle: the run's
momentum, which today's mirrored estimator steps along, is not in it). What the first order leaves out:
the sample's own g² in Adam's second moment (``bench probe`` measures it) and, unless ``clip='exact'``, the
clipping factor, which needs each sample's gradient norm.

The direction is written into DDP's gradient buffers (dead between steps: the snapshot's restore zeroes them),
so a round adds no parameter-sized tensor. Under the distributed optimizer each rank forms d on its Adam shard
and the buckets are all-gathered, as megatron-core gathers parameters. The step ``s`` moves the parameters by
``relative_step`` of their norm (1e-3: measured in ``bench probe``; 1e-2 is past the linear range of a
sample's loss at the demo's learning rate); the model is restored bit-exactly after the two passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.distributed.param_and_grad_buffer import shard_buffer

from mates_megatron.probe.context import (
    ProbeContext,
    counted_params,
    param_grad,
    replica_local_grads,
    width,
    zero_grads,
)
from mates_megatron.probe.estimators import ESTIMATORS, Estimator, batched_losses
from mates_megatron.runtime.optimizers import AdamTerms, adam_terms, megatron_optimizers
from mates_megatron.runtime.schedule import Batch, eval_mode, token_mean_backward

_CHUNK = 1 << 22
"""Elements per chunk when forming the direction (16 MB fp32 temporaries whatever the parameter)."""

CLIP_MODES = ("none", "exact")


@ESTIMATORS.register("forward")
class ForwardProber(Estimator):
    """score(x) = loss_before + <g_ref, u0> - c(x) · <∇loss_x, d>, the derivative by two batched forward passes."""

    method = "forward"
    steps_optimizer = False  # nothing steps: replicas split the samples under the distributed optimizer too
    sync_grads = True  # no gradient pass in the probes (``clip='exact'`` switches the sync off itself)

    def __init__(
        self,
        ctx: ProbeContext,
        *,
        micro_batch_size: int | None = None,
        relative_step: float = 1e-3,
        clip: str = "none",
    ) -> None:
        super().__init__(ctx)
        if clip not in CLIP_MODES:
            raise ValueError(f"ForwardProber clip={clip!r}: choose one of {', '.join(CLIP_MODES)}")
        self.micro_batch_size = micro_batch_size or ctx.micro_batch_size
        self.relative_step, self.clip = relative_step, clip

    # -- the round's direction ------------------------------------------------------------------------------

    def reference_loss_before(self) -> float:
        ctx = self.ctx
        with replica_local_grads(ctx, always=True), eval_mode(ctx.model_chunks):
            zero_grads(ctx)
            total = token_mean_backward(
                ctx.model_chunks,
                ctx.reference,
                seq_length=width(ctx.reference, ctx.seq_length),
                device=ctx.device,
                forward_backward_func=ctx.forward_backward_func,
            )
        if ctx.groups.pipeline_parallel_size > 1:
            dist.all_reduce(total, group=ctx.groups.pipeline_parallel)
        self._constant = self._write_direction()
        self._before = float(total[0] / total[1])
        return self._before

    def _write_direction(self) -> float:
        """Turn the reference gradient in the grad buffers into d, in place; return <g_ref, u0>."""
        ctx = self.ctx
        counted = {id(p) for p in counted_params(ctx)}
        constant = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for t in adam_terms(ctx.optimizer):
            g = param_grad(t.param).view(-1)[t.offset : t.offset + t.main.numel()]
            for i in range(0, g.numel(), _CHUNK):
                constant += _direction_chunk(t, g, slice(i, i + _CHUNK), count=id(t.param) in counted)
        if ctx.distributed_optimizer and ctx.groups.data_parallel_size > 1:
            _gather_shards(ctx.model_chunks)
        if dist.get_world_size(ctx.groups.model_parallel) > 1:
            dist.all_reduce(constant, group=ctx.groups.model_parallel)
        if ctx.distributed_optimizer and ctx.groups.data_parallel_size > 1:
            dist.all_reduce(constant, group=ctx.groups.data_parallel)
        return float(constant)

    def _step_size(self) -> float:
        """s such that s·||d|| = relative_step · ||θ|| over the model (each parameter counted once)."""
        ctx = self.ctx
        sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        for p in counted_params(ctx):
            sums[0] += p.detach().float().square().sum()
            sums[1] += param_grad(p).float().square().sum()
        if dist.get_world_size(ctx.groups.model_parallel) > 1:
            dist.all_reduce(sums, group=ctx.groups.model_parallel)
        theta, d = (float(x) ** 0.5 for x in sums)
        if d == 0.0:
            raise RuntimeError("the reference gradient is zero: the reference set has no counted tokens")
        return self.relative_step * theta / d

    @torch.no_grad()
    def _move(self, by: float) -> None:
        """Parameters += by·d, computed in fp32 and rounded once to the parameter's dtype.

        From the live values, not the snapshot's: under the distributed optimizer with overlapped parameter
        gathers, the snapshot (taken at the step boundary) still holds the other ranks' shards from before the
        last step; the reference pass's forward has gathered them since.
        """
        for c in self.ctx.model_chunks:
            for p in c.parameters():
                d = param_grad(p)
                if d is not None:
                    p.copy_(p.float().add_(d.view(p.shape).float(), alpha=by))

    # -- the probes -----------------------------------------------------------------------------------------

    def probe_share(self, samples: Sequence[Batch], mine: np.ndarray) -> dict[int, float]:
        assert self.snapshot is not None
        if self.clip == "exact":
            # Each sample's own gradient norm needs its gradient: one forward-backward per sample (a reference
            # measurement of what the clipping factor is worth, not a fast path). It runs before the direction
            # exists, on the snapshot's weights, so the direction is written afterwards.
            factors = self._clip_factors(samples, mine)
            self.snapshot.restore()
            with self.phase("reference"):
                self.reference_loss_before()
        else:
            factors = torch.ones(len(mine), dtype=torch.float64, device=self.ctx.device)
        s = self._step_size()
        with self.phase("forward"):
            self._move(s)
            plus = batched_losses(self.ctx, samples, mine, self.micro_batch_size)
            self._move(-2 * s)
            minus = batched_losses(self.ctx, samples, mine, self.micro_batch_size)
        with self.phase("restore"):
            self.snapshot.restore()
        derivative = (plus - minus) / (2 * s)
        scores = self._before + self._constant - factors * derivative
        return {int(i): float(v) for i, v in zip(mine, scores.tolist(), strict=True)}

    def _clip_factors(self, samples: Sequence[Batch], mine: np.ndarray) -> torch.Tensor:
        ctx = self.ctx
        clip = float(megatron_optimizers(ctx.optimizer)[0].config.clip_grad)
        out = torch.ones(len(mine), dtype=torch.float64, device=ctx.device)
        if clip <= 0:
            return out
        params = counted_params(ctx)
        with replica_local_grads(ctx, always=True):
            for k, i in enumerate(mine):
                with self.phase("forward_backward"):
                    zero_grads(ctx)
                    ctx.run([samples[int(i)]], forward_only=False)
                    sq = torch.zeros((), dtype=torch.float64, device=ctx.device)
                    for p in params:
                        sq += param_grad(p).double().square().sum()
                    if dist.get_world_size(ctx.groups.model_parallel) > 1:
                        dist.all_reduce(sq, group=ctx.groups.model_parallel)
                out[k] = min(1.0, clip / (float(sq) ** 0.5 + 1e-6))  # megatron-core's clip_grad_by_total_norm
        return out


def _direction_chunk(t: AdamTerms, g: torch.Tensor, part: slice, *, count: bool) -> torch.Tensor:
    """Overwrite ``g[part]`` (the reference gradient) with d; return this chunk's <g_ref, u0> (if ``count``)."""
    bc1 = 1.0 - t.beta1 ** (t.step + 1)
    bc2 = 1.0 - t.beta2 ** (t.step + 1)
    main = t.main.detach().view(-1)[part]
    denom = t.exp_avg_sq.view(-1)[part].float().mul(t.beta2 / bc2).sqrt_().add_(t.eps)
    gref = g[part].float()
    constant = torch.zeros((), dtype=torch.float64, device=g.device)
    if count:
        # u0: the update with a zero-gradient sample: momentum, and weight decay (AdamW: decoupled; Adam: L2,
        # which enters the moments like a gradient).
        u0 = t.exp_avg.view(-1)[part].float().mul(-t.lr * t.beta1 / bc1).div_(denom)
        if t.decoupled:
            u0.add_(main.float(), alpha=-t.lr * t.weight_decay)
        else:
            u0.addcdiv_(main.float(), denom, value=-t.lr * (1 - t.beta1) / bc1 * t.weight_decay)
        constant += torch.dot(gref, u0).double()
    g[part].copy_(gref.mul_(t.lr * (1 - t.beta1) / bc1).div_(denom))
    return constant


def _gather_shards(model_chunks) -> None:
    """Each rank formed d on its distributed-optimizer shard of every bucket; gather the buckets whole."""
    for chunk in model_chunks:
        for group in list(getattr(chunk, "bucket_groups", [])) + list(
            getattr(chunk, "expert_parallel_bucket_groups", [])
        ):
            size = group.intra_distributed_optimizer_instance_size
            rank = group.intra_distributed_optimizer_instance_rank
            for bucket in group.buckets:
                local = shard_buffer(bucket.grad_data, size)[rank]
                dist.all_gather_into_tensor(
                    bucket.grad_data, local, group=group.intra_distributed_optimizer_instance_group
                )

"""Model passes the model-based tracers share: candidate batches, per-document losses, gradients as vectors.

Every pass runs in eval mode (no dropout: a trace is a deterministic function of the checkpoint) and
through megatron-core's schedule, so TP and PP shards work as they do in training. Gradients are read
replica-locally (each data-parallel replica differentiates its own documents) and only this rank's shard of
each parameter is read, each parameter counted once over the model-parallel group; a dot product of two
such vectors is completed by a sum over that group.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from mates_megatron.probe.context import (
    ProbeContext,
    counted_params,
    param_grad,
    replica_local_grads,
    zero_grads,
)
from mates_megatron.runtime.schedule import Batch, collate, eval_mode, per_sample_losses


def candidate_batches(pool, ids: np.ndarray, micro_batch_size: int) -> list[Batch]:
    """The candidates' training rows as micro-batches; the last is padded with copies of its last row."""
    rows = [pool.training_sample(int(g)) for g in ids]
    rows += [rows[-1]] * (-len(rows) % micro_batch_size)
    return [collate(rows[i : i + micro_batch_size]) for i in range(0, len(rows), micro_batch_size)]


def losses(ctx: ProbeContext, batches: Sequence[Batch], n: int) -> np.ndarray:
    """Mean counted-token loss of the first ``n`` rows of ``batches`` (float64)."""
    if n == 0:
        return np.zeros(0)
    out = per_sample_losses(
        ctx.model_chunks,
        batches,
        seq_length=ctx.seq_length,
        device=ctx.device,
        forward_backward_func=ctx.forward_backward_func,
    )
    return out[:n].double().cpu().numpy()


def gradient(ctx: ProbeContext, batch: Batch, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """This rank's shard of the gradient of ``batch``'s token-mean loss, flattened (float32)."""
    with replica_local_grads(ctx, always=True), eval_mode(ctx.model_chunks):
        zero_grads(ctx)
        ctx.run([batch], forward_only=False)
    parts = []
    for p in params:
        g = param_grad(p)
        parts.append((g if g is not None else torch.zeros_like(p)).detach().float().reshape(-1))
    out = torch.cat(parts)  # a copy: the parts are views of the grad buffers zeroed next
    zero_grads(ctx)
    return out


def _query_gradient(ctx: ProbeContext, batch: Batch, step: str) -> tuple[dict, float]:
    """Every parameter's gradient of ``batch``'s loss on this rank (None where it has none) and the whole
    gradient's norm over the model-parallel group; FloatingPointError naming ``step`` when it is 0 or not
    finite. The caller zeroes the gradients after its step."""
    params = counted_params(ctx)
    with torch.enable_grad(), replica_local_grads(ctx, always=True), eval_mode(ctx.model_chunks):
        zero_grads(ctx)
        ctx.run([batch], forward_only=False)
    grads = {p: param_grad(p) for c in ctx.model_chunks for p in c.parameters()}
    sq = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for p in params:  # each parameter counted once over the model-parallel group
        if grads[p] is not None:
            sq += grads[p].double().pow(2).sum()
    norm = float(model_parallel_sum(ctx, sq).sqrt())
    if not np.isfinite(norm) or norm == 0:
        raise FloatingPointError(
            f"trace {step} step: the query's gradient norm is {norm}; the query has no counted token or the "
            "checkpoint is not finite"
        )
    return grads, norm


@torch.no_grad()
def descend(ctx: ProbeContext, batch: Batch, drop: float, steps: int = 1) -> float:
    """``steps`` plain-descent steps on ``batch``, each lowering its loss by ``drop`` nats to first order
    (``theta -= drop * g / |g|^2``); returns the first gradient's norm. The caller restores the model."""
    first = None
    for _ in range(steps):
        grads, norm = _query_gradient(ctx, batch, "descent")
        first = norm if first is None else first
        for p, g in grads.items():  # duplicated (TP-replicated) parameters get the same step on every rank
            if g is not None:
                p.data.add_(g.to(p.dtype), alpha=-drop / norm**2)
        zero_grads(ctx)
    return first


@torch.no_grad()
def adam_ascent(ctx: ProbeContext, batch: Batch, lr: float, eps: float = 1e-8) -> float:
    """One Adam step of gradient *ascent* on ``batch`` from a fresh optimizer state (Forward-INF's notebook:
    ``torch.optim.Adam(lr)`` on the negated query loss). Adam's first step, bias-corrected, is
    ``lr * g / (|g| + eps)`` elementwise, whatever its betas, so it is taken in that closed form on the
    sharded parameters; returns the gradient's norm. The caller restores the model."""
    grads, norm = _query_gradient(ctx, batch, "ascent")
    for p, g in grads.items():
        if g is not None:
            g = g.float()
            p.data.add_((lr * g / (g.abs() + eps)).to(p.dtype))
    zero_grads(ctx)
    return norm


def model_parallel_sum(ctx: ProbeContext, t: torch.Tensor) -> torch.Tensor:
    """Complete per-shard partial sums over the tensor x pipeline group."""
    if dist.get_world_size(ctx.groups.model_parallel) > 1:
        dist.all_reduce(t, group=ctx.groups.model_parallel)
    return t


def query_rows(inp, query_tokens: str):
    """The queries' rows with the loss over their target tokens ("target") or every token ("all")."""
    rows = inp.queries.rows
    if rows is None:
        raise ValueError("model-based tracing needs tokenised queries")
    if query_tokens not in ("target", "all"):
        raise ValueError(f"query_tokens={query_tokens!r}: use 'target' or 'all'")
    return rows if query_tokens == "target" else rows.with_all_tokens()

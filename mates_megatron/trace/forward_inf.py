"""Forward-INF (Ko et al., CVPR 2024, the mirrored influence hypothesis): train on the query, watch the pool.

The influence of a training document on a query mirrors the influence of the query on the document's loss.
So, per query: ``steps`` gradient-descent steps on the query alone, each sized so that it lowers the query's
loss by ``drop`` nats to first order (``theta -= drop * g / |g|^2``: one setting serves every query and model
size), then one forward pass over every candidate; score = loss before - loss after (a document the query's
fact supports gets easier). To first order this is ``drop / |g_q|^2 * <g_d, g_q>``, gradient-dot's score,
with no per-document backward pass: the pool costs one batched forward per query, and the loss before is
computed once for all queries. The model is restored after every query.

The step must stay in the first-order regime: on the bench's model (query gradient norm ~10), steps of
0.001 and 0.01 in parameter norm (drops of ~0.01 and ~0.1 nats) give loss changes that correlate 0.99999
and 0.998 with gradient-dot's; a step of 0.1 only 0.57 and of 1.0 (the query's own loss then rises) -0.29.

Plain descent rather than the run's optimizer: a resumed Adam's step is dominated by its moments from
training (the same direction for every query), which would drown the query's own gradient.

``form: adam_ascent`` is the authors' notebook instead: one step of a fresh Adam (lr 5e-3) of gradient ascent
on the query (their query duplicated twice in a batch: with a token-mean loss that is the same gradient), then
score = loss after - loss before (a document the query supports gets harder). A fresh Adam's first step is
``lr * sign(g)`` up to eps: every parameter moves by lr, not along the gradient, so it leaves the first-order
regime above and is not gradient-dot's ranking.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from mates_megatron.probe.reference import make_batch
from mates_megatron.probe.snapshot import TrainingSnapshot
from mates_megatron.trace.base import TRACERS, TopK, TraceInput, Tracer, TraceResult, chunks, replica_share
from mates_megatron.trace.model_passes import adam_ascent, candidate_batches, descend, losses, query_rows


@dataclass
class ForwardInfOptions:
    query_tokens: str = "all"
    """As ``GradientOptions.query_tokens``: "all" (the fact's whole statement) or "target"."""
    drop: float = 0.05
    """First-order decrease of the query's loss per descent step, in nats (sets the step's length)."""
    steps: int = 1
    micro_batch_size: int = 16
    """Candidates per forward pass."""
    form: str = "first_order"
    """"first_order" (descent steps sized by ``drop``, the default) or "adam_ascent" (the authors' notebook:
    one fresh-Adam ascent step of ``lr``; ``drop`` and ``steps`` do not apply)."""
    lr: float = 5e-3
    """The Adam step's learning rate (form "adam_ascent"; the authors' notebook's 5e-3)."""

    def __post_init__(self) -> None:
        if not (self.drop > 0 and np.isfinite(self.drop)) or self.steps < 1 or self.micro_batch_size < 1:
            raise ValueError(
                f"forward-inf options drop={self.drop}, steps={self.steps}, micro_batch_size="
                f"{self.micro_batch_size}: need drop > 0, steps >= 1, micro_batch_size >= 1"
            )
        if self.form not in ("first_order", "adam_ascent"):
            raise ValueError(f"forward-inf options form={self.form!r}: use 'first_order' or 'adam_ascent'")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ValueError(f"forward-inf options lr={self.lr}: need lr > 0")


@TRACERS.register("forward-inf")
class ForwardInfTracer(Tracer):
    Config: ClassVar[type] = ForwardInfOptions
    method = "forward-inf"

    def __init__(self, options: ForwardInfOptions | None = None) -> None:
        self.options = options or ForwardInfOptions()

    def trace(self, inp: TraceInput) -> TraceResult:
        ctx, rows = inp.model, query_rows(inp, self.options.query_tokens)
        if ctx is None:
            raise ValueError("forward-inf tracing needs the model and tokenised queries")
        t0 = time.perf_counter()
        mbs = self.options.micro_batch_size
        mine = replica_share(inp)
        before = np.concatenate(
            [
                losses(ctx, candidate_batches(inp.pool, ids, mbs), len(ids))
                for ids in chunks(inp, mine, "loss before")
            ]
            or [np.zeros(0)]
        )
        per_query, norms = [], []
        snap = TrainingSnapshot(ctx.model_chunks, ctx.optimizer, ctx.scheduler)
        try:
            for qi in range(len(rows)):
                query = make_batch(rows.tokens[qi : qi + 1], rows.loss_mask[qi : qi + 1])
                ascent = self.options.form == "adam_ascent"
                if ascent:
                    norms.append(adam_ascent(ctx, query, self.options.lr))
                else:
                    norms.append(descend(ctx, query, self.options.drop, self.options.steps))
                top, start = TopK(1, inp.top_k), 0
                for ids in chunks(inp, mine, f"forward-inf query {qi + 1}/{len(rows)}"):
                    after = losses(ctx, candidate_batches(inp.pool, ids, mbs), len(ids))
                    change = before[start : start + len(ids)] - after
                    top.add(ids, (-change if ascent else change)[None])
                    start += len(ids)
                per_query.append(top)
                snap.restore()
        finally:
            snap.restore()
        top = TopK.stack(per_query)
        ids, scores = top.merged(ctx.groups.data_parallel).result()
        return TraceResult(
            ids, scores, self.method,
            record={"seconds": time.perf_counter() - t0, "query_grad_norm": [float(n) for n in norms]},
        )  # fmt: skip

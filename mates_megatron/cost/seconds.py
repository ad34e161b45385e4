"""Seconds of a round's work on one rank: the GPT's passes, the memory-bound optimizer work of the probes, training
steps and the influence stage, from counts (FLOPs, bytes, operators, tokens, collectives) and ``Machine`` rates.

What a GPU pays that a FLOP count leaves out, and where it is counted here:

- a pass is its matmuls at the machine's rate (batch 1 runs at its own), plus the logits' softmax and cross
  entropy and the layers' elementwise work over memory bandwidth, plus the framework's per-layer overhead, plus
  (backward) the gradient accumulation into DDP's fp32 buffers, plus the tensor-parallel all-reduces;
- pipeline stages pass a micro-batch one after another: m micro-batches over pp stages take (m + pp - 1) stage
  times, so one probe sample at batch 1 takes the whole model's time (pp x a stage's), however many stages;
- a probe that steps the optimizer pays the step, the restore of the snapshot and (linearized) the dot over the
  rank's parameters and Adam state at memory bandwidth, every probe;
- under the distributed optimizer an estimator that steps it probes every sample on every replica (x dp), with the
  gradients' reduce-scatter and the parameters' all-gather per probe;
- the influence stage decodes and tokenises every candidate on the host: on the rank's thread (loader_workers 0), or in
  loader workers ahead of the encoder, counting only what they cannot hide behind it.

Byte counts per element are the kernels' reads and writes as megatron-core 0.16 and this project run them (below,
by name). The projection is per rank: the round waits for the slowest, and every rank does the same work here.
"""

from __future__ import annotations

from mates_megatron.cost.machine import Machine
from mates_megatron.cost.shapes import Layout, TransformerShape

# Bytes per element of the memory-bound kernels, fp32 unless said.
GRAD_ACCUMULATE = 16
"""Backward, per parameter: the gradient written (4) and added into DDP's main_grad (read 4, read and write 8)."""
GRAD_NORM = 4
"""Per main element, gradient clipping's norm (a read)."""
CLIP = 8
"""Per main element, the gradients scaled down by the clipping factor (read and write; a single sample's gradient
norm is usually above ``clip_grad``, so counted every step)."""
MAIN_TO_PARAM = 6
"""Per main element under bf16: the fp32 main copy read (4) and written to the bf16 parameter (2)."""
ZERO = 4
"""Per parameter: zeroing DDP's gradient buffer."""
DOT = 20
"""Linearized, per main element: the update (live - saved: read 8, write 4) dotted with the gradient (read 8)."""
GRAD_CLONE = 8
"""Linearized, per main element: the reference gradient copied out (read 4, write 4)."""
DIRECTION = 92
"""Forward, per main element: the Adam-preconditioned direction and <g_ref, u0> (denominator 24, momentum term 32,
dot 8, the direction written in place 28)."""
STEP_SIZE = 24
"""Forward, per parameter: the squared norms of the parameters and the direction (square 8 + sum 4, each)."""
MOVE = 20
"""Forward, per parameter and move: snapshot + s x direction (read 8, write 4), copied in (read 4, write 4)."""


class RankSeconds:
    """The seconds of one rank's share of each kind of work for a GPT of ``model`` laid out as ``layout``."""

    def __init__(self, model: TransformerShape, layout: Layout, machine: Machine, seq_length: int) -> None:
        self.model, self.layout, self.machine, self.seq = model, layout, machine, seq_length
        self.params = model.parameters()
        self.n_rank = self.params / (layout.tp * layout.pp)
        """Parameters on one model-parallel rank."""
        self.n_opt = self.n_rank / layout.dp if layout.distributed_optimizer else self.n_rank
        """fp32 main elements (and Adam moments) this rank steps: its shard under the distributed optimizer."""

    # -- primitives ---------------------------------------------------------------------------------------------

    def memory(self, nbytes: float) -> float:
        return nbytes / self.machine.memory_bandwidth

    def collective(self, nbytes: float = 0.0, ranks: int = 2, *, count: int = 1) -> float:
        """``count`` ring collectives (all-reduce counts as reduce-scatter + all-gather: pass 2x bytes) of
        ``nbytes`` over ``ranks`` devices of the model's groups."""
        if ranks <= 1:
            return 0.0
        m = self.machine
        return count * (m.collective_latency_s + nbytes * (ranks - 1) / ranks / m.link_bandwidth)

    def pass_seconds(self, rows: int, *, backward: bool) -> float:
        """One micro-batch of ``rows`` rows through the whole model (every pipeline stage, one after another)."""
        m, g, lay, S = self.machine, self.model, self.layout, self.seq
        tokens = rows * S
        rate = m.matmul_flops_batch1 if rows == 1 else m.matmul_flops
        times = 3 if backward else 1
        matmuls = tokens * g.forward_flops_per_token(S) / (lay.tp * rate)  # the forward's
        compute = matmuls * (1 + (2 / m.backward_matmul_speedup if backward else 0))
        logits = m.logit_bytes_forward_backward if backward else m.logit_bytes_forward
        compute += self.memory(tokens * g.vocab_size * logits / lay.tp)
        act = g.activation_elements_per_token(S, scores=not m.fused_attention) * lay.param_bytes
        compute += self.memory(tokens * g.num_layers * act * times / lay.tp)
        if backward:  # every stage accumulates its own parameters' gradients
            compute += self.memory(self.n_rank * lay.pp * GRAD_ACCUMULATE)
        # Megatron's tensor parallelism: two all-reduces of the activations per layer forward and two backward;
        # the vocab-parallel embedding's all-reduce and the cross entropy's three small ones.
        activation = 2 * tokens * g.hidden_size * lay.param_bytes
        compute += self.collective(activation, lay.tp, count=2 * g.num_layers * (2 if backward else 1) + 1)
        compute += self.collective(0.0, lay.tp, count=3)
        overhead = (m.pass_overhead_s + g.num_layers * m.layer_overhead_s) * (2 if backward else 1)
        return max(compute, overhead) if m.overlapped_launch else compute + overhead

    def pipeline(self, rows: int, *, backward: bool, padded: bool = False) -> float:
        """``rows`` rows in micro-batches of the layout's size (the last one short, or ``padded`` to full size as
        the batched probes pad it): the stages' sum plus (pp - 1) of the longest (the pipeline's fill and
        drain: m equal micro-batches take m + pp - 1 stage times), plus the point-to-point sends between
        stages. One row (a probe at batch 1) is the whole model's pass, pp stages one after another."""
        lay = self.layout
        full, last = divmod(rows, lay.micro_batch_size)
        sizes = {lay.micro_batch_size: full}
        if last:
            size = lay.micro_batch_size if padded else last
            sizes[size] = sizes.get(size, 0) + 1
        sizes = {b: k for b, k in sizes.items() if k}
        if not sizes:
            return 0.0
        stage = {b: self.pass_seconds(b, backward=backward) / lay.pp for b in sizes}
        micro = sum(sizes.values())
        total = sum(k * stage[b] for b, k in sizes.items()) + (lay.pp - 1) * max(stage.values())
        if lay.pp > 1:
            activation = max(sizes) * self.seq * self.model.hidden_size * lay.param_bytes
            one = self.machine.collective_latency_s + activation / self.machine.link_bandwidth
            total += (micro + lay.pp - 2) * one * (2 if backward else 1)
        return total

    # -- optimizer and snapshot work ---------------------------------------------------------------------------

    @property
    def optimizer_shards(self) -> int:
        """Ranks Adam's state is sharded over: the data-parallel replicas under the distributed optimizer."""
        return self.layout.dp if self.layout.distributed_optimizer else 1

    @property
    def _model_parallel(self) -> int:
        return self.layout.tp * self.layout.pp

    def zero(self) -> float:
        return self.memory(self.n_rank * ZERO)

    def optimizer_step(self) -> float:
        """The run's Adam on this rank's main elements, clipping's norm, the bf16 copy-back; under the distributed
        optimizer the parameters' all-gather, and the norm's all-reduce over the groups that hold shards."""
        lay = self.layout
        per = self.machine.adam_bytes_per_element + GRAD_NORM + CLIP + (MAIN_TO_PARAM if lay.bf16 else 0)
        t = self.memory(self.n_opt * per)
        t += self.collective(self.n_rank * lay.param_bytes, self.optimizer_shards)
        if self._model_parallel * self.optimizer_shards > 1:
            t += self.machine.collective_latency_s
        return t

    def grad_reduce_scatter(self) -> float:
        """Under the distributed optimizer a stepping probe's gradients are reduce-scattered to the shards."""
        return self.collective(self.n_rank * 4, self.optimizer_shards)

    def snapshot_bytes(self) -> float:
        """Parameters, fp32 main copies (bf16) and both Adam moments: what a capture or a restore copies."""
        lay = self.layout
        return self.n_rank * 2 * lay.param_bytes + (self.n_opt * 8 if lay.bf16 else 0) + self.n_opt * 16

    def restore(self) -> float:
        """Every captured tensor copied back (parameters, main copies, both moments), the gradients zeroed."""
        return self.memory(self.snapshot_bytes() + self.n_rank * ZERO)

    def dot(self) -> float:
        """The update (live - saved) dotted with the reference gradient."""
        t = self.memory(self.n_opt * DOT)
        if self._model_parallel > 1:
            t += self.machine.collective_latency_s
        if self.optimizer_shards > 1:
            t += self.machine.collective_latency_s
        return t

    def training_step(self, global_batch_size: int) -> float:
        """One step: (global batch / dp) rows through the pipeline, forward and backward, then the optimizer.
        The data-parallel gradient reduce overlaps the backward (not counted)."""
        rows = max(1, global_batch_size // self.layout.dp)
        return self.pipeline(rows, backward=True) + self.optimizer_step() + self.zero()

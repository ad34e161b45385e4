"""Calibrate the cost model's machine constants on this machine: a matmul, memory passes, an Adam step, the
influence tokenizer and a tiny megatron-core GPT, each timed on its own.

``calibrate(shape, ...)`` returns a ``Machine`` for the shapes the bench runs (the matmuls at the GPT's own
linear shapes, at one row and at the micro-batch). Times are read with ``clock``: on a CPU shared with other jobs
``time.process_time`` (this process's CPU seconds, one intra-op thread) counts the work and not the waiting, and
the bench times the phases it compares with the same clock. The collective constants are not measured here
(one process): they are the preset's. Runs where megatron-core's parallel state is initialised (the overheads
build a GPT), e.g. inside ``run_on_ranks``; the 'cpu-2core' preset (``cost.machine``) holds one such run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from mates_megatron.cost import MACHINES, Machine, TransformerShape

_FLUSH: list[torch.Tensor] = []


def _flush() -> None:
    """Write 128 MB (more than the last-level cache holds) so that the next kernel finds its tensors cold, as a
    probe's memory-bound work finds them after the passes before it."""
    if not _FLUSH:
        _FLUSH.append(torch.zeros(1 << 25))
    _FLUSH[0].add_(1.0)


def _timed(
    fn: Callable[[], object], clock: Callable[[], float], *, reps: int, blocks: int = 5, cold: bool = False
) -> float:
    """Median over ``blocks`` of the mean seconds of ``reps`` calls (after one warm-up call); ``cold``: the
    caches flushed before each call, outside the time."""
    fn()
    times = []
    for _ in range(blocks):
        total = 0.0
        for _ in range(reps):
            if cold:
                _flush()
            t = clock()
            fn()
            total += clock() - t
        times.append(total / reps)
    return statistics.median(times)


def _linears(shape: TransformerShape) -> list[tuple[tuple[int, int], int]]:
    h, f, L = shape.hidden_size, shape.ffn_hidden_size, shape.num_layers
    return [((h, 3 * h), L), ((h, h), L), ((h, f), L), ((f, h), L), ((h, shape.vocab_size), 1)]


def matmul_rates(shape: TransformerShape, tokens: int, clock: Callable[[], float]) -> tuple[float, float]:
    """(forward FLOP/s, backward speed-up) of the GPT's linear layers at ``tokens`` rows, weighted by FLOPs:
    each [tokens, k] x [k, n] forward, and its input gradient [tokens, n] x [n, k] and weight gradient
    [n, tokens] x [tokens, k]."""
    flops = forward = backward = 0.0
    for (k, n), count in _linears(shape):
        x, w, dy = torch.randn(tokens, k), torch.randn(n, k), torch.randn(tokens, n)
        one = 2.0 * tokens * k * n
        reps = max(1, int(2e9 // one))
        forward += count * _timed(lambda x=x, w=w: x @ w.t(), clock, reps=reps)
        backward += count * _timed(lambda dy=dy, w=w: dy @ w, clock, reps=reps)
        backward += count * _timed(lambda dy=dy, x=x: dy.t() @ x, clock, reps=reps)
        flops += count * one
    return flops / forward, forward / (backward / 2)


def parameter_sizes(shape: TransformerShape) -> list[int]:
    """Element counts of the GPT's parameter tensors, one per tensor (megatron-core's layer: QKV, projection and
    the MLP's two matrices with their biases, two LayerNorms; the embedding, a position table, a final norm)."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    layer = [3 * h * h, 3 * h, h * h, h, h * f, f, f * h, h, h, h, h, h]
    rest = [shape.vocab_size * h] * (1 if shape.tied_embeddings else 2) + [
        shape.position_embeddings * h,
        h,
        h,
    ]
    return [n for n in layer * shape.num_layers + rest if n]


def memory_rates(shape: TransformerShape, clock: Callable[[], float]) -> tuple[float, float]:
    """(bytes/s of passes over existing tensors, bytes/s of copies into new memory) over tensors shaped like the
    GPT's parameters, three sets of them (the parameters and Adam's two moments: more than the caches hold).

    The passes are the kernels of a probe's memory-bound work: a copy and zeroing (a snapshot restore, the
    gradient buffers), a subtraction into a new tensor and a dot (the linearized dot). Counted bytes are reads
    plus writes; an add in place is left out of the mix, since it writes lines it has just read and so moves
    its counted bytes faster than a copy or zeroing, which first read the lines they overwrite. New memory: a
    clone into pages touched for the first time (a snapshot's capture of freshly mapped memory)."""
    sizes = parameter_sizes(shape) * 3
    src, other, dst = ([torch.randn(n) for n in sizes] for _ in range(3))
    total = sum(sizes)

    def each(fn):
        return lambda: [fn(a, b, c) for a, b, c in zip(src, other, dst, strict=True)]

    kernels = [
        (each(lambda a, b, c: c.copy_(a)), 8),
        (each(lambda a, b, c: c.zero_()), 4),
        (each(lambda a, b, c: a - b), 12),
        (each(lambda a, b, c: torch.dot(a, b)), 8),
    ]
    seconds = sum(_timed(fn, clock, reps=2, cold=True) for fn, _ in kernels)
    big = torch.randn(1 << 24)  # 64 MB: above glibc's largest mmap threshold, so every clone maps new pages
    fresh = 8 * big.numel() / _timed(big.clone, clock, reps=2, cold=True)
    return sum(per for _, per in kernels) * total / seconds, fresh


def logit_bytes(shape: TransformerShape, tokens: int, bandwidth: float, clock) -> tuple[float, float]:
    """Bytes per logit (at ``bandwidth``) of megatron-core's vocab-parallel cross entropy over ``tokens`` rows of
    the GPT's vocabulary: forward, and forward and backward."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = torch.randn(tokens, 1, shape.vocab_size)
    labels = torch.randint(0, shape.vocab_size, (tokens, 1))

    def forward():
        with torch.no_grad():
            vocab_parallel_cross_entropy(logits, labels)

    def both():
        x = logits.detach().requires_grad_()
        vocab_parallel_cross_entropy(x, labels).sum().backward()

    per = bandwidth / (tokens * shape.vocab_size)
    return _timed(forward, clock, reps=1) * per, _timed(both, clock, reps=1) * per


def adam_bytes(shape: TransformerShape, bandwidth: float, clock: Callable[[], float]) -> float:
    """Bytes per element one step of torch's AdamW (megatron-core's optimizer without apex or TransformerEngine)
    moves over tensors shaped like the GPT's parameters, at ``bandwidth``: its seconds x bandwidth / elements."""
    params = [torch.nn.Parameter(torch.randn(n)) for n in parameter_sizes(shape)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    return _timed(opt.step, clock, reps=2, cold=True) * bandwidth / sum(p.numel() for p in params)


def tokenize_rate(
    clock: Callable[[], float],
    *,
    seq_length: int = 128,
    n: int = 200,
    read: Callable[[int], str] | None = None,
) -> float:
    """Pretraining tokens per second decoded to text and tokenised by the influence encoder's tokenizer, one
    candidate at a time as ``CandidateTexts`` reads them and the encoder tokenises a batch: ``read(i)`` (a pool's
    text: its read and decode), else random ordinary word pieces of the encoder's vocabulary decoded here (what
    ``bench round``'s synthetic pool holds)."""
    from mates_megatron.data.tokenizer import load_tokenizer
    from mates_megatron.influence.config import InfluenceConfig

    tok = load_tokenizer(InfluenceConfig().resolved_path())
    if read is None:
        ids = [
            np.random.default_rng([0, i]).integers(1996, tok.vocab_size, seq_length).tolist()
            for i in range(n)
        ]

        def read(i: int) -> str:
            return tok.decode(ids[i])

    def run():
        tok([read(i) for i in range(n)], add_special_tokens=False)

    return n * seq_length / _timed(run, clock, reps=1)


def ngram_rate(clock: Callable[[], float], *, seq_length: int = 128, n: int = 200) -> float:
    """Pretraining tokens per second decoded to text, featurized by the classifier's hashed word n-grams
    (``ClassifierConfig``'s defaults) and scored by a sparse dot, one thread: a 'classifier' or 'dsir' filter's
    pass over a round, on the same synthetic candidates as ``tokenize_rate``."""
    from mates_megatron.data.tokenizer import load_tokenizer
    from mates_megatron.influence.config import InfluenceConfig
    from mates_megatron.scorers.classifier import ClassifierScorer

    tok = load_tokenizer(InfluenceConfig().resolved_path())
    ids = [
        np.random.default_rng([0, i]).integers(1996, tok.vocab_size, seq_length).tolist() for i in range(n)
    ]
    vectorizer = ClassifierScorer().vectorizer
    w = np.random.default_rng(0).normal(size=vectorizer.n_features)

    def run():
        vectorizer.transform([tok.decode(ids[i]) for i in range(n)]) @ w

    return n * seq_length / _timed(run, clock, reps=1)


def lookup_op_seconds(
    clock: Callable[[], float], *, hidden: int = 384, tokens: int = 128, n: int = 200
) -> float:
    """Seconds per eager operator of the token-embedding lookup as the encoder runs it per candidate (a tensor
    from the ids, an index, a mean, a row written: four), on a table small enough that the bytes do not count."""
    table = torch.randn(1000, hidden)
    ids = [np.random.default_rng([1, i]).integers(0, 1000, tokens).tolist() for i in range(n)]
    out = torch.zeros(n, hidden)

    def run():
        with torch.no_grad():
            for b, t in enumerate(ids):
                out[b] = table[torch.tensor(t)].mean(0)

    return _timed(run, clock, reps=1) / (4 * n)


def host_flops(clock: Callable[[], float]) -> float:
    """FLOP/s of numpy's float64 BLAS on one thread (as under torchrun's one OMP thread): the ridge fit's
    products and solves, at its shapes (a few hundred probes by a 384-wide feature)."""
    from threadpoolctl import threadpool_limits

    a, b = np.random.rand(256, 384), np.random.rand(384, 384) + 384 * np.eye(384)
    with threadpool_limits(1):
        seconds = _timed(lambda: (a.T @ a, np.linalg.solve(b, a.T)), clock, reps=5)
    return (2.0 * 256 * 384 * 384 + 2 / 3 * 384**3 + 2.0 * 384 * 384 * 256) / seconds


def overheads(clock: Callable[[], float]) -> tuple[float, float]:
    """(per pass, per layer) seconds of an eval forward at batch 1 of a megatron-core GPT too small to compute
    anything (hidden 16, 8 tokens), from one and three layers."""
    from mates_megatron.training.model import GPTConfig, build_gpt_model

    seconds = []
    for layers in (1, 3):
        cfg = GPTConfig(num_layers=layers, hidden_size=16, num_attention_heads=2, ffn_hidden_size=64,
                        seq_length=8, vocab_size=128, make_vocab_size_divisible_by=64)  # fmt: skip
        model = build_gpt_model(cfg, cpu=True).eval()
        tokens, positions = torch.randint(0, 128, (1, 8)), torch.arange(8)[None]

        def run(model=model, tokens=tokens, positions=positions):
            with torch.no_grad():
                model(tokens, positions, None, labels=tokens)

        seconds.append(_timed(run, clock, reps=20))
    per_layer = max(0.0, (seconds[1] - seconds[0]) / 2)
    return max(0.0, seconds[0] - per_layer), per_layer


def calibrate(
    shape: TransformerShape,
    *,
    seq_length: int,
    micro_batch_size: int,
    clock: Callable[[], float] = time.process_time,
    name: str = "calibrated",
    base: str = "cpu-2core",
) -> Machine:
    """Machine constants measured now, in this process, for a GPT of ``shape`` (collectives: ``base``'s)."""
    bandwidth, fresh = memory_rates(shape, clock)
    pass_s, layer_s = overheads(clock)
    tokens = micro_batch_size * seq_length
    flops, speedup = matmul_rates(shape, tokens, clock)
    forward, both = logit_bytes(shape, tokens, bandwidth, clock)
    return replace(
        MACHINES[base],
        name=name,
        matmul_flops=flops,
        matmul_flops_batch1=matmul_rates(shape, seq_length, clock)[0],
        backward_matmul_speedup=speedup,
        memory_bandwidth=bandwidth,
        fresh_memory_bandwidth=fresh,
        logit_bytes_forward=forward,
        logit_bytes_forward_backward=both,
        adam_bytes_per_element=adam_bytes(shape, bandwidth, clock),
        pass_overhead_s=pass_s,
        layer_overhead_s=layer_s,
        op_overhead_s=lookup_op_seconds(clock),
        host_flops=host_flops(clock),
        tokenize_tokens_per_s=tokenize_rate(clock, seq_length=seq_length),
        ngram_tokens_per_s=ngram_rate(clock, seq_length=seq_length),
        source=f"calibrated in this process ({torch.get_num_threads()} intra-op thread(s), clock "
        f"{getattr(clock, '__name__', clock)}) at the GPT's shapes (layers {shape.num_layers}, hidden "
        f"{shape.hidden_size}, vocab {shape.vocab_size}; {seq_length} and {tokens} tokens); collectives: "
        f"{base}'s",
    )


def mean_machine(machines: list[Machine], name: str) -> Machine:
    """The mean of several calibrations' constants (one before and one after a measurement brackets the load of
    a shared machine)."""
    fields = {k: float(np.mean([getattr(m, k) for m in machines])) for k, v in machines[0].to_dict().items()
              if isinstance(v, float)}  # fmt: skip
    return replace(machines[0], name=name, **fields)

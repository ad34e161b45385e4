"""Machine constants of the time projection: what one device (and its host) sustains, by name.

A projection in seconds multiplies counts (FLOPs, bytes, operators, tokens, collectives) by these rates. Each
preset says where its figures come from: ``cpu-2core`` was calibrated on the project's 2-core CPU machine by
``mates_lab.bench.calibrate`` (``mates-lab bench round`` recalibrates in the run and prints both); ``h100``
is taken from NVIDIA's public H100 SXM figures and the fractions of them that Megatron-LM GPT training typically
reaches, never measured here. Choose one with ``SelectionConfig.cost_machine``; pass your own ``Machine`` to
``project_mates_round`` for another device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Machine:
    """Sustained rates of one device running the GPT (and of its host), for the seconds of a round's phases."""

    name: str
    matmul_flops: float
    """FLOP/s of the GPT's matmuls at the run's micro-batch (rows x seq_length tokens per pass), one device."""
    matmul_flops_batch1: float
    """FLOP/s of the same matmuls at one row (a probe's forward-backward)."""
    backward_matmul_speedup: float
    """How much faster per FLOP a backward's matmuls (input and weight gradients) run than the forward's."""
    memory_bandwidth: float
    """Bytes/s that elementwise passes over parameter-sized tensors reach (copies, zeroing, subtractions into new
    tensors, dots), counting each kernel's reads and writes."""
    fresh_memory_bandwidth: float
    """Bytes/s of copies into newly allocated memory (a snapshot's capture: the first touch of its pages costs
    the kernel's page faults on a CPU; a GPU's caching allocator hands back blocks it holds)."""
    logit_bytes_forward: float
    """Bytes per logit that the vocabulary cross entropy's forward moves at ``memory_bandwidth`` (counted:
    max 4, subtract 8, exp 8, sum 4, normalise 8 = 32)."""
    logit_bytes_forward_backward: float
    """The same for its forward and backward (counted: 32 + the softmax scaled in place, 8 = 40)."""
    adam_bytes_per_element: float
    """Bytes moved per fp32 main element by one step of the Adam this machine runs (a fused kernel reads the
    gradient, the main weight and both moments and writes three: 28; torch's per-tensor AdamW on CPU runs about
    eight kernels and allocates temporaries)."""
    pass_overhead_s: float
    """Seconds a forward pass of one micro-batch costs beside its arithmetic (embedding, loss, schedule):
    operator dispatch in eager CPU PyTorch, kernel launches on a GPU. A backward adds as much again."""
    layer_overhead_s: float
    """The same, per transformer layer."""
    op_overhead_s: float
    """Seconds of one small eager operator (dispatch and launch), for work done a few operators per item (the
    token-embedding features: a tensor from the ids, an index, a mean and a row written, per candidate)."""
    host_flops: float
    """FLOP/s of float64 BLAS on one host thread (numpy: the ridge fit's solves)."""
    tokenize_tokens_per_s: float
    """Host, one thread: pretraining tokens decoded to text and tokenised by the encoder's tokenizer per second
    (the influence stage's input path on the training process, where torchrun sets one OMP thread)."""
    ngram_tokens_per_s: float
    """Host, one thread: pretraining tokens decoded to text, featurized by a hashed word n-gram vectorizer and
    scored by a sparse dot per second (a 'classifier' or 'dsir' filter's pass over a round)."""
    collective_latency_s: float
    """Seconds of one small collective (an all-reduce of a scalar) in the model's groups."""
    link_bandwidth: float
    """Bytes/s per device of a ring collective in the model's groups (bus bandwidth)."""
    host_link_bandwidth: float
    """Bytes/s of a collective through host memory (the influence group is gloo: scores, the fit's gradients)."""
    fused_attention: bool = False
    """Attention scores never reach memory (flash or cuDNN attention, TransformerEngine on a GPU); else they are
    written, masked and normalised per head per token (megatron-core's local attention)."""
    overlapped_launch: bool = False
    """Launches are asynchronous (a GPU): a pass costs max(arithmetic, overhead), not their sum."""
    source: str = ""
    """Where the figures come from (calibration machine and date, or the public figures used)."""

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            if isinstance(v, float) and not v >= 0:
                raise ValueError(f"Machine {self.name!r}: {k}={v} must be >= 0")
        if min(self.matmul_flops, self.matmul_flops_batch1, self.memory_bandwidth) <= 0:
            raise ValueError(f"Machine {self.name!r}: matmul rates and memory_bandwidth must be > 0")

    def to_dict(self) -> dict:
        return asdict(self)


MACHINES: dict[str, Machine] = {
    "cpu-2core": Machine(
        name="cpu-2core",
        matmul_flops=60e9,
        matmul_flops_batch1=105e9,
        backward_matmul_speedup=1.45,
        memory_bandwidth=9.8e9,
        fresh_memory_bandwidth=3.9e9,
        logit_bytes_forward=28.0,
        logit_bytes_forward_backward=55.0,
        adam_bytes_per_element=83.0,
        pass_overhead_s=1.0e-3,
        layer_overhead_s=1.8e-3,
        op_overhead_s=3e-5,
        host_flops=15.8e9,
        tokenize_tokens_per_s=1.67e5,
        ngram_tokens_per_s=3.5e5,
        collective_latency_s=9e-4,
        link_bandwidth=0.8e9,
        host_link_bandwidth=0.8e9,
        source="calibrated on the project's 2-core CPU machine (Xeon @ 2.8 GHz, 48 MB L3, shared: load 5-8) by "
        "mates_lab.bench.calibrate in CPU seconds, one thread: the bench GPT's matmuls (4 layers, hidden 128, "
        "vocab 30592; 128 and 2,048 tokens), memory passes over parameter-shaped tensors, the vocabulary cross "
        "entropy, torch AdamW, a 1- and 3-layer megatron-core GPT for the overheads, the MiniLM tokenizer on the "
        "bench's synthetic candidates, float64 BLAS; collectives: gloo between 2 processes, wall-clock. The n-gram "
        "rate (decode, scikit-learn's HashingVectorizer at 2**18 buckets, uni+bigrams, a sparse dot) was measured "
        "later beside the tokenizer's, at 2.1x its rate (5.5e5 against 2.6e5 tokens/s, load 6), and is set at 2.1x "
        "the tokenizer's calibrated rate",
    ),
    "h100": Machine(
        name="h100",
        matmul_flops=650e12,
        matmul_flops_batch1=450e12,
        backward_matmul_speedup=1.0,
        memory_bandwidth=2.8e12,
        fresh_memory_bandwidth=2.8e12,
        logit_bytes_forward=32.0,
        logit_bytes_forward_backward=40.0,
        adam_bytes_per_element=28.0,
        pass_overhead_s=1e-4,
        layer_overhead_s=1e-4,
        op_overhead_s=1e-5,
        host_flops=50e9,
        tokenize_tokens_per_s=2.0e5,
        ngram_tokens_per_s=4.2e5,
        collective_latency_s=2e-5,
        link_bandwidth=350e9,
        host_link_bandwidth=2e9,
        fused_attention=True,
        overlapped_launch=True,
        source="public figures, not measured here: H100 SXM bf16 dense peak 989 TFLOP/s, of which large bf16 "
        "GEMMs reach about 65% (the GEMMs of one 1,024-token row: about 45%), so that with the elementwise work "
        "counted a Pythia-1B training step projects at about 45% MFU; HBM3 3.35 TB/s peak, "
        "about 2.8 TB/s reached by streaming kernels; NVLink 4 at about 350 GB/s of all-reduce bus bandwidth; "
        "~20 us per small NCCL collective; ~25 launches of ~4 us per layer; fused Adam. The host's decode and "
        "tokenise rate was measured on the CPU machine (one thread, the embedded corpus's text: a server core is of "
        "the same order), the n-gram rate at 2.1x it as measured there; float64 BLAS on one server core ~50 GFLOP/s; gloo through host memory ~2 GB/s",
    ),
}


def get_machine(machine: Machine | str) -> Machine:
    """A preset by name, or the Machine itself."""
    if isinstance(machine, Machine):
        return machine
    if machine not in MACHINES:
        raise ValueError(f"no machine {machine!r}: choose one of {', '.join(MACHINES)} or pass a Machine")
    return MACHINES[machine]

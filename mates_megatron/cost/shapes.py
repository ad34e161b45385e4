"""What the cost model needs of the models and of the run's layout: a transformer's shape (FLOPs, parameters) and
how the GPT is laid out over devices (data, tensor and pipeline parallel sizes, micro-batch, optimizer)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TransformerShape:
    """What the FLOP count needs of a transformer: the GPT being trained or the influence encoder."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    vocab_size: int
    """For the GPT's logits; unused for an encoder (no output layer in its forward)."""
    num_attention_heads: int = 0
    """For the attention's elementwise work (scores per token per head); 0: hidden_size / 64."""
    tied_embeddings: bool = True
    """The output layer shares the input embedding (Megatron-LM without --untie-embeddings-and-output-weights)."""
    position_embeddings: int = 0
    """Rows of a learned absolute position table (0: rotary or none)."""

    @classmethod
    def from_encoder_dir(cls, path: str | Path) -> TransformerShape:
        """A BERT-style encoder's shape from its ``config.json`` (read only, no weights)."""
        c = json.loads((Path(path) / "config.json").read_text())
        return cls(
            c["num_hidden_layers"],
            c["hidden_size"],
            c["intermediate_size"],
            c["vocab_size"],
            num_attention_heads=c.get("num_attention_heads", 0),
            position_embeddings=c.get("max_position_embeddings", 0) + c.get("type_vocab_size", 0),
        )

    @property
    def heads(self) -> int:
        return self.num_attention_heads or max(1, self.hidden_size // 64)

    def forward_flops_per_token(self, context: int, *, logits: bool = True) -> float:
        h, L = self.hidden_size, self.num_layers
        weights = L * (4 * h * h + 2 * h * self.ffn_hidden_size)
        return 2.0 * weights + (2.0 * self.vocab_size * h if logits else 0.0) + 4.0 * L * context * h

    def parameters(self) -> int:
        """Weights, biases and layer norms (megatron-core's GPT layer: QKV, projection, two MLP matrices, two
        LayerNorms), the embedding (twice when untied), a final LayerNorm and any learned position table."""
        h, f = self.hidden_size, self.ffn_hidden_size
        layer = 4 * h * h + 2 * h * f + 9 * h + f
        embedding = self.vocab_size * h * (1 if self.tied_embeddings else 2)
        return self.num_layers * layer + 2 * h + embedding + self.position_embeddings * h

    def activation_elements_per_token(self, context: int, *, scores: bool = True) -> float:
        """Elements read and written per token per layer by a forward's elementwise work (layer norms, bias
        adds, residuals, GELU and, unless ``scores`` is False (fused attention), the attention scores' mask and
        softmax), counted on megatron-core's local layer: 26 x hidden + 4 x FFN + 6 x heads x context. The
        backward is counted as twice this."""
        att = 6.0 * self.heads * context if scores else 0.0
        return 26.0 * self.hidden_size + 4.0 * self.ffn_hidden_size + att


@dataclass(frozen=True)
class Layout:
    """How the GPT runs: what the cost model needs of the host's parallel layout and precision."""

    dp: int = 1
    """Data-parallel replicas."""
    tp: int = 1
    """Tensor-parallel size: a pass's matmuls and logits are split over tp devices."""
    pp: int = 1
    """Pipeline stages: one micro-batch passes them one after another."""
    micro_batch_size: int = 8
    """Rows per forward pass in training, the reference passes and the batched probes."""
    distributed_optimizer: bool = False
    """Adam's state and fp32 main copies sharded over the data-parallel replicas (estimators that step the
    optimizer then probe every sample on every replica)."""
    bf16: bool = False
    """bf16 parameters with fp32 main copies (2-byte parameters, an extra main copy to step and restore)."""

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"Layout.{name}={getattr(self, name)} must be >= 1")

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def param_bytes(self) -> int:
        return 2 if self.bf16 else 4

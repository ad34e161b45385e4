"""GPT model provider: megatron-core GPTModel with the local layer spec (transformer-engine on request)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig


@dataclass
class GPTConfig:
    """Shape of the GPT model (names follow Megatron-LM's arguments)."""

    num_layers: int = 4
    """Transformer layers; must be divisible by the pipeline-parallel size."""
    hidden_size: int = 128
    """Model width; must be divisible by num_attention_heads."""
    num_attention_heads: int = 4
    """Attention heads; must be divisible by the tensor-parallel size."""
    ffn_hidden_size: int | None = None
    """MLP width (default 4 x hidden_size)."""
    seq_length: int = 128
    """Training sequence length in tokens."""
    vocab_size: int = 30522
    """Tokenizer vocabulary size; padded up to make_vocab_size_divisible_by x TP."""
    make_vocab_size_divisible_by: int = 128
    """Vocabulary padding unit, as in Megatron-LM."""
    hidden_dropout: float = 0.0
    """Dropout after attention/MLP."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    init_method_std: float = 0.02
    """Std of the normal weight initialisation."""
    transformer_impl: str = "local"
    """'local' (pure PyTorch layer spec, runs anywhere) or 'transformer_engine' (needs CUDA + TE)."""
    sequence_parallel: bool = True
    """With TP > 1 on GPU, keep layer-norm and dropout activations split along the sequence (Megatron-LM's
    --sequence-parallel, on in Bridge's recipes). CPU mode runs without it."""
    bf16: bool = False
    """Train in bf16 with fp32 main weights (Megatron-LM's --bf16: the whole model in bf16 through
    megatron-core's Float16Module, Adam on fp32 main copies). Runs on CPU too, slowly."""

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "seq_length",
            "vocab_size",
            "make_vocab_size_divisible_by",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)} must be >= 1")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.ffn_hidden_size < 1:
            raise ValueError(
                f"GPTConfig.ffn_hidden_size={self.ffn_hidden_size} must be >= 1 (or null: 4 x hidden_size)"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)} must be in [0, 1)")
        if self.init_method_std <= 0:
            raise ValueError(f"GPTConfig.init_method_std={self.init_method_std} must be > 0")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"GPTConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.transformer_impl not in ("local", "transformer_engine"):
            raise ValueError(
                f"GPTConfig.transformer_impl={self.transformer_impl!r}: use 'local' or 'transformer_engine'"
            )

    def padded_vocab_size(self, tp: int) -> int:
        unit = self.make_vocab_size_divisible_by * tp
        return ((self.vocab_size + unit - 1) // unit) * unit

    def transformer_config(self, *, cpu: bool) -> TransformerConfig:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if self.num_attention_heads % tp:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not divisible by TP={tp}")
        if self.num_layers % pp:
            raise ValueError(f"num_layers={self.num_layers} is not divisible by PP={pp}")
        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            ffn_hidden_size=self.ffn_hidden_size,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            init_method_std=self.init_method_std,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            pipeline_dtype=torch.bfloat16 if self.bf16 else torch.float32,
            bf16=self.bf16,
            params_dtype=torch.bfloat16 if self.bf16 else torch.float32,
            use_cpu_initialization=cpu,
            # Reference losses are compared across probes at the 1e-3 nat level: keep softmax in fp32.
            attention_softmax_in_fp32=True,
            # CPU mode: plain ops (the fused kernels are GPU code; the math is the same). On a GPU the fusions
            # megatron-core has without extensions (jit-scripted bias-GeLU and bias-dropout) always, and with
            # TransformerEngine its fused softmax and weight-gradient accumulation; the masked-softmax kernel and
            # persistent layer norm of the local spec are compiled extensions (Megatron-LM's, apex) that a plain
            # GPU install lacks.
            bias_activation_fusion=not cpu,
            bias_dropout_fusion=not cpu,
            masked_softmax_fusion=not cpu and self.transformer_impl == "transformer_engine",
            gradient_accumulation_fusion=not cpu and self.transformer_impl == "transformer_engine",
            persist_layer_norm=False,
            apply_rope_fusion=False,
            sequence_parallel=not cpu and tp > 1 and self.sequence_parallel,
        )


def layer_spec(cfg: GPTConfig):
    if cfg.transformer_impl == "transformer_engine":
        try:
            from megatron.core.models.gpt.gpt_layer_specs import (
                get_gpt_layer_with_transformer_engine_spec,
            )

            return get_gpt_layer_with_transformer_engine_spec()
        except ImportError as e:  # pragma: no cover - GPU clusters only
            raise ImportError(
                "transformer_impl='transformer_engine' needs transformer-engine: "
                "pip install 'mates-megatron[te]' on a CUDA machine, or use transformer_impl='local'"
            ) from e
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec()


def build_gpt_model(
    cfg: GPTConfig, *, cpu: bool, pre_process: bool | None = None, post_process: bool | None = None
) -> GPTModel:
    """Build this rank's GPTModel shard (TP/PP from parallel_state). Seed with model_parallel_seed first."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = GPTModel(
        config=cfg.transformer_config(cpu=cpu),
        transformer_layer_spec=layer_spec(cfg),
        vocab_size=cfg.padded_vocab_size(tp),
        max_sequence_length=cfg.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=True,
        position_embedding_type="learned_absolute",
    )
    if not cpu:
        model.cuda(torch.cuda.current_device())
    return model


def in_model_precision(model: GPTModel, cfg: GPTConfig) -> torch.nn.Module:
    """The model as Megatron-LM trains it under ``--bf16``: wrapped in megatron-core's ``Float16Module``, which
    casts every parameter (the local spec creates layer norms and position embeddings in fp32) and the first
    stage's inputs to bf16, and the last stage's outputs back to fp32. Unchanged in fp32."""
    if not cfg.bf16:
        return model
    from megatron.core.transformer.module import Float16Module

    return Float16Module(model.config, model)

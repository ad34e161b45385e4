"""Move full (TP=1, PP=1) GPT weights into this rank's TP/PP shard, and gather TP-sharded tensors back.

megatron-core marks every tensor-parallel parameter with ``tensor_model_parallel=True`` and its
``partition_dim``; this uses those marks, so it follows whatever layer spec built the model. Used by the
parity tests (a TP=2 or PP=2 model with exactly the weights of a TP=1 model) and by the probe tests.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state

_LAYER = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")


def _layer_offset(model) -> int:
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    rank = parallel_state.get_pipeline_model_parallel_rank()
    return rank * (model.config.num_layers // pp)


def global_name(local_name: str, offset: int) -> str:
    """The full model's name of a parameter: pipeline stages number their layers from 0."""
    m = _LAYER.match(local_name)
    return f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}" if m else local_name


def load_full_state(model, full: dict[str, torch.Tensor]) -> None:
    """Copy the matching slice of each full tensor into this rank's parameters (in place)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    offset = _layer_offset(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = global_name(name, offset)
            if key == "output_layer.weight" and key not in full:
                # Tied output layer on the last pipeline stage: a copy of the word embeddings.
                key = "embedding.word_embeddings.weight"
            src = full[key]
            if getattr(param, "tensor_model_parallel", False) and tp > 1:
                src = src.chunk(tp, dim=param.partition_dim)[tp_rank]
            if src.shape != param.shape:
                raise ValueError(
                    f"{name}: full tensor slice {tuple(src.shape)} != shard {tuple(param.shape)}"
                )
            param.copy_(src)


def gather_tp(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate TP-sharded tensors (named like the model's parameters) over the TP group; global names."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    offset = _layer_offset(model)
    params = dict(model.named_parameters())
    out = {}
    for name, t in tensors.items():
        p = params[name]
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = torch.cat(parts, dim=p.partition_dim)
        out[global_name(name, offset)] = t
    return out

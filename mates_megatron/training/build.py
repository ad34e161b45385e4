"""The demo host's edge: a TrainConfig becomes a Trainer, with the plugin attached when it selects data."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from mates_megatron.config import SelectionConfig
from mates_megatron.probe.settings import Refusal, Spelling, check_probe_settings, core_values
from mates_megatron.runtime.optimizers import megatron_optimizers
from mates_megatron.training.loop import TrainConfig, Trainer

# The megatron-core config fields the loop sets from a TrainConfig field (training/loop.py, training/model.py).
_TRAIN_CONFIG_FIELDS = {
    "ddp.use_distributed_optimizer": "use_distributed_optimizer",
    "optimizer.use_distributed_optimizer": "use_distributed_optimizer",
    "model.bf16": "model.bf16",
    "optimizer.bf16": "model.bf16",
}


def _setting(r: Refusal, value: Any) -> str:
    field = _TRAIN_CONFIG_FIELDS.get(r.core)
    return (
        f"TrainConfig.{field}={value!r}"
        if field
        else f"{r.core}={value!r} in the configs mates_megatron.training builds"
    )


def _fix(r: Refusal) -> str:
    field = _TRAIN_CONFIG_FIELDS.get(r.core)
    if field:
        return f"set TrainConfig.{field}={r.accepted!r}"
    return f"TrainConfig has no field for it: build {r.core}={r.accepted!r}"


def check_loop_probe_settings(selection: SelectionConfig, *, model: Any, ddp: Any, optimizer: Any) -> None:
    """Refuse the settings under which ``selection``'s probes on the live model would be wrong
    (``probe.settings``), read from the megatron-core configs the loop built: ``model`` (TransformerConfig),
    ``ddp`` (DistributedDataParallelConfig), ``optimizer`` (OptimizerConfig). TrainConfig sets none of them
    today; the check keeps it so when the loop grows a setting."""
    spelling = Spelling(scorer=f"selection.scorer {selection.scorer!r}", setting=_setting, fix=_fix)
    check_probe_settings(
        selection, core_values({"model": model, "ddp": ddp, "optimizer": optimizer}), spelling
    )


def build_trainer(cfg: TrainConfig) -> Trainer:
    """A Trainer for ``cfg``: Megatron's order without ``cfg.selection``, else the plugin's pool and rounds.

    Collective (model parallel groups; with a scorer, its process groups).
    """
    if cfg.selection is None:
        return Trainer(cfg)
    sel = cfg.selection

    def data(trainer: Trainer):
        from mates_megatron.plugin import build_plugin

        check_loop_probe_settings(
            sel,
            model=trainer.model.config,
            ddp=trainer.model.ddp_config,
            optimizer=megatron_optimizers(trainer.optimizer)[0].config,
        )
        tokenizer = None
        if sel.needs_text_decoding:
            from mates_megatron.data.tokenizer import load_tokenizer

            # Indexed candidates are token ids: scorers that read text decode them.
            tokenizer = load_tokenizer(cfg.tokenizer or trainer.tokenizer_info.path)
        shape, layout = round_shape(cfg, trainer.dp_size)
        plugin = build_plugin(
            sel,
            train_iters=cfg.train_iters,
            global_batch_size=cfg.global_batch_size,
            micro_batch_size=cfg.micro_batch_size,
            seq_length=cfg.model.seq_length,
            dp_rank=trainer.dp_rank,
            dp_size=trainer.dp_size,
            build_indexed_dataset=trainer.build_dataset,
            write_files=dist.get_rank() == 0,
            tokenizer=tokenizer,
            device=trainer.device,
            model_shape=shape,
            layout=layout,
            reference_rows=len(trainer.reference) if trainer.reference is not None else 0,
        )
        return plugin.pool, plugin.sampler, [plugin.hook]

    return Trainer(cfg, data=data)


def round_shape(cfg: TrainConfig, dp_size: int):
    """(TransformerShape, Layout) of the GPT that ``cfg`` trains with ``dp_size`` replicas: what the plugin
    projects a scored round against."""
    from mates_megatron.cost import Layout, TransformerShape

    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    shape = TransformerShape(
        m.num_layers, m.hidden_size, m.ffn_hidden_size, m.padded_vocab_size(tp),
        num_attention_heads=m.num_attention_heads, tied_embeddings=True, position_embeddings=m.seq_length,
    )  # fmt: skip
    layout = Layout(
        dp=dp_size, tp=tp, pp=cfg.parallel.pipeline_model_parallel_size, micro_batch_size=cfg.micro_batch_size,
        distributed_optimizer=cfg.use_distributed_optimizer, bf16=m.bf16,
    )  # fmt: skip
    return shape, layout


def check_round_cost_before_launch(cfg: TrainConfig, *, world: int | None = None, where: str = "") -> None:
    """Refuse, before any process starts, the run whose scored round ``build_plugin`` would refuse at its
    start (``max_selection_cost``), projected on ``world`` processes (None: one replica, TP x PP): ValueError
    starting with ``where``, naming the lever."""
    from mates_megatron.cost import check_round_cost
    from mates_megatron.probe.reference import read_jsonl
    from mates_megatron.scorers import SCORERS

    sel = cfg.selection
    if sel is None or not sel.scored:
        return
    parallel = cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
    shape, layout = round_shape(cfg, max(1, (world or parallel) // parallel))
    cost = SCORERS.get(sel.scorer).projected_cost(
        sel.scorer_config, sel, model=shape, seq_length=cfg.model.seq_length,
        global_batch_size=cfg.global_batch_size, layout=layout,
        reference_rows=len(read_jsonl(cfg.reference)) if cfg.reference else 0,
    )  # fmt: skip
    if cost is not None:
        try:
            check_round_cost(cost, sel.max_selection_cost)
        except ValueError as e:
            raise ValueError(f"{where}: {e}" if where else str(e)) from None

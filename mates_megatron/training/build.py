"""The demo host's edge: a TrainConfig becomes a Trainer, with the plugin attached when it selects data."""

from __future__ import annotations

import torch.distributed as dist

from mates_megatron.training.loop import TrainConfig, Trainer


def build_trainer(cfg: TrainConfig) -> Trainer:
    """A Trainer for ``cfg``: Megatron's order without ``cfg.selection``, else the plugin's pool and rounds.

    Collective (model parallel groups; with a scorer, its process groups).
    """
    if cfg.selection is None:
        return Trainer(cfg)
    sel = cfg.selection

    def data(trainer: Trainer):
        from mates_megatron.cost import TransformerShape
        from mates_megatron.plugin import build_plugin

        tokenizer = None
        if sel.needs_text_decoding:
            from mates_megatron.data.tokenizer import load_tokenizer

            # Indexed candidates are token ids: scorers that read text decode them.
            tokenizer = load_tokenizer(cfg.tokenizer or trainer.tokenizer_info.path)
        m = cfg.model
        tp = cfg.parallel.tensor_model_parallel_size
        shape = TransformerShape(m.num_layers, m.hidden_size, m.ffn_hidden_size, m.padded_vocab_size(tp))
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
            reference_rows=len(trainer.reference) if trainer.reference is not None else 0,
        )
        return plugin.pool, plugin.sampler, [plugin.hook]

    return Trainer(cfg, data=data)

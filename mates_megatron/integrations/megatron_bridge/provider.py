"""MatesDatasetProvider: Bridge's dataset-provider hook-up for the MATES train split.

Bridge (``megatron.bridge.training.config.DatasetProvider``) calls ``build_datasets(context)`` in setup on every
rank; with ``dataloader_type='external'`` it wraps what comes back in ``RerunDataIterator`` as is. The train
split is built as the candidate pool (1 / selection_ratio x the samples trained on, with Bridge's own GPT
provider, on every rank) and handed to the callback, which serves MatesSampler's selection from it once the
model exists. Validation and test splits are served as Bridge serves a GPT config's ('cyclic').

Importing this module imports Bridge's config (and so its package, which needs transformer-engine).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from mates_megatron.integrations.megatron_bridge.imports import import_bridge
from mates_megatron.plugin import pool_num_samples

DatasetProvider = import_bridge("megatron.bridge.training.config").DatasetProvider


@dataclass(kw_only=True)
class MatesDatasetProvider(DatasetProvider):
    base: Any = None
    """The recipe's dataset config (a GPTDatasetConfig): data paths, split, sequence length, tokenizer."""
    _callback: Any = field(default=None, repr=False, compare=False)
    """The MatesCallback given to pretrain (a runtime object: leading '_' keeps it out of run_config.yaml)."""

    @classmethod
    def wrap(cls, base, callback) -> MatesDatasetProvider:
        loader_fields = {
            f.name: getattr(base, f.name) for f in fields(DatasetProvider) if hasattr(base, f.name)
        }
        return cls(**{**loader_fields, "dataloader_type": "external"}, base=base, _callback=callback)

    @property
    def seq_length(self) -> int:
        return self.base.seq_length

    def build_datasets(self, context):
        from megatron.core import parallel_state as ps
        from megatron.core.num_microbatches_calculator import (
            get_current_global_batch_size,
            get_micro_batch_size,
        )

        bridge_data = import_bridge("megatron.bridge.data.utils")
        samplers = import_bridge("megatron.bridge.data.samplers")
        if hasattr(self.base, "finalize") and not getattr(self, "_finalized", False):
            self.base.finalize()  # Bridge finalizes a GPTDatasetConfig itself, not one inside a provider
            self._finalized = True
        gbs = get_current_global_batch_size()
        sel = self._callback.selection
        n_train = context.train_samples
        if sel.pool_is_host_dataset:
            n_train = pool_num_samples(sel, train_iters=context.train_samples // gbs, global_batch_size=gbs)
        train_ds, valid_ds, test_ds = bridge_data.pretrain_train_valid_test_datasets_provider(
            [n_train, context.valid_samples, context.test_samples], self.base
        )

        def loader(ds):
            if ds is None:
                return None
            return samplers.build_pretraining_data_loader(
                ds, 0, "cyclic", get_micro_batch_size(), self.num_workers, self.data_sharding,
                pin_memory=self.pin_memory, data_parallel_rank=ps.get_data_parallel_rank(),
                data_parallel_size=ps.get_data_parallel_world_size(), global_batch_size=gbs,
            )  # fmt: skip

        return self._callback.provide(train_ds, loader(valid_ds), loader(test_ds))

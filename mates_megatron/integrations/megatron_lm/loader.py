"""Megatron-LM's train data loader over MatesSampler, and the plugin built around Megatron-LM's train split.

Megatron-LM iterates its train loader with ``next()`` and never rewinds it. A torch DataLoader draws indices
ahead of training (prefetch, workers), so each stretch of published rounds is read through its own torch
DataLoader over ``MatesSampler.batches(start, published_end(start))``; when it runs out at a round boundary,
the next stretch starts from the position reached, which the hook has published by then (it runs at the end
of the round's last step).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mates_megatron.config import SelectionConfig
from mates_megatron.pool.base import PoolError
from mates_megatron.sampler import MatesSampler


class _Stretch:
    """Batch sampler of one stretch: the sampler's micro-batches from ``start`` to the published end."""

    def __init__(self, sampler: MatesSampler, start: int) -> None:
        self.sampler, self.start = sampler, start
        self.end = sampler.published_end(start)

    def __iter__(self) -> Iterator[list[int]]:
        return self.sampler.batches(self.start, self.end)

    def __len__(self) -> int:
        chunk = self.sampler.micro_batch_size * self.sampler.data_parallel_size
        return max(0, (self.end - self.start) // chunk)


class MatesDataLoader:
    """Megatron-LM's train data loader over MatesSampler (what ``iter()`` gives is Megatron's iterator)."""

    def __init__(
        self,
        dataset,
        sampler: MatesSampler,
        *,
        consumed_samples: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        collate_fn=None,
        worker_init_fn=None,
    ) -> None:
        self.dataset, self.sampler, self.consumed_samples = dataset, sampler, consumed_samples
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.collate_fn, self.worker_init_fn = collate_fn, worker_init_fn

    @property
    def chunk(self) -> int:
        return self.sampler.micro_batch_size * self.sampler.data_parallel_size

    def torch_loader(self, start: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=_Stretch(self.sampler, start),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=self.collate_fn,
            worker_init_fn=self.worker_init_fn,
            # An iterator draws its workers' base seed from this generator: the default one would take a draw
            # from torch's global RNG each time a loader starts (here at every resume, not in the run that
            # goes on), and where dropout draws from that RNG too (CPU mode) a resumed run would train on
            # other dropout masks. The batches do not depend on it (the sampler orders them).
            generator=torch.Generator().manual_seed(0),
        )

    def __iter__(self) -> Iterator:
        return _MatesBatches(self, self.consumed_samples)

    def __len__(self) -> int:
        """Micro-batches this rank has left to serve."""
        return max(0, (self.sampler.total_samples - self.consumed_samples) // self.chunk)


class _MatesBatches:
    def __init__(self, loader: MatesDataLoader, position: int) -> None:
        self.loader, self.position = loader, position
        self._it: Iterator | None = None

    def __iter__(self) -> _MatesBatches:
        return self

    def __next__(self):
        s = self.loader.sampler
        if self.position + self.loader.chunk > s.total_samples:
            raise StopIteration
        if self._it is None:
            self._it = iter(self.loader.torch_loader(self.position))
        try:
            batch = next(self._it)
        except StopIteration:
            # A round boundary: the hook has published the next round since this stretch began.
            self._it = iter(self.loader.torch_loader(self.position))
            try:
                batch = next(self._it)
            except StopIteration:
                raise PoolError(
                    f"round {s.round_of(self.position)} has no published selection at sample "
                    f"{self.position}: mates_step_end(iteration, ...) must run after every train_step "
                    "(apply patches/megatron-lm-core_v0.16.1-mates.patch to Megatron-LM)"
                ) from None
        self.position += self.loader.chunk
        return batch


def _given_dataset(train_ds):
    """``build_indexed_dataset`` for build_plugin: Megatron-LM has built the train split already."""

    def build(num_samples: int):
        if train_ds is None:
            raise ValueError(
                "MATES needs the train split on every rank (the probes run the model on every rank): "
                "Megatron-LM built none here; apply the patch's is_dataset_built_on_rank hunk"
            )
        if not getattr(train_ds, "dataset_path", None):
            raise ValueError(
                f"--mates-pool indexed wraps one GPTDataset, got {type(train_ds).__name__}: give a single "
                "--data-path prefix (a blend makes a BlendedDataset), or use --mates-pool webdataset"
            )
        if len(train_ds) < num_samples:
            raise ValueError(
                f"the train split has {len(train_ds)} samples, the MATES pool needs {num_samples} "
                "(train_iters / select_every rounds x select_every x global_batch_size / selection_ratio): "
                "build it with mates_train_valid_test_num_samples (the patch does)"
            )
        return train_ds

    return build


def build_mates_data_loader(
    sel: SelectionConfig,
    train_ds,
    *,
    train_iters: int,
    global_batch_size: int,
    micro_batch_size: int,
    seq_length: int,
    consumed_samples: int,
    dp_rank: int,
    dp_size: int,
    tokenizer=None,
    device: torch.device | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    write_files: bool = False,
    plugin=None,
    worker_init_fn=None,
    model_shape=None,
    reference_rows: int = 0,
    layout=None,
):
    """(MatesDataLoader, Plugin) for a Megatron-LM train split (``plugin`` given: reuse it).

    pool='indexed' takes its candidates from ``train_ds`` (a GPTDataset at least ``pool_num_samples``
    long) and serves ``train_ds[id]`` as Megatron builds it; other pools serve their own samples and leave
    ``train_ds`` unused. ``tokenizer`` decodes indexed candidates for scorers that read text. Collective
    when ``plugin`` is None and the scorer creates process groups. ``model_shape``, ``reference_rows`` and
    ``layout``: the scorer's round is projected and checked against ``max_selection_cost`` (see build_plugin).
    """
    if plugin is None:
        from mates_megatron.plugin import build_plugin

        plugin = build_plugin(
            sel,
            train_iters=train_iters,
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
            seq_length=seq_length,
            dp_rank=dp_rank,
            dp_size=dp_size,
            build_indexed_dataset=_given_dataset(train_ds),
            write_files=write_files,
            tokenizer=tokenizer,
            device=device,
            model_shape=model_shape,
            reference_rows=reference_rows,
            layout=layout,
        )
    loader = MatesDataLoader(
        train_ds if sel.pool_is_host_dataset else plugin.pool,
        plugin.sampler,
        consumed_samples=consumed_samples,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=worker_init_fn,
    )
    return loader, plugin

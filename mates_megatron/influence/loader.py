"""The encoder's inputs, read, decoded and tokenised in DataLoader worker processes.

Reading a candidate (decoding a pool's token ids to text) and tokenising it again is host work that the training
process does on one thread (torchrun sets OMP_NUM_THREADS=1): on an accelerator it, not the encoder, bounds the
influence stage. ``batches`` hands a fixed list of batches (position ranges or position arrays into a text
sequence) to ``InfluenceConfig.loader_workers`` worker processes, each reading and tokenising whole batches on
one thread, and yields them in order on the model's device: pinned host memory and non-blocking copies when the
device is CUDA. Every batch is produced exactly once and in the given order, whatever the worker count, so the
scores do not depend on it (tests/distributed/test_influence_loader.py).

Workers are forked, as Megatron's own data loaders are, and draw nothing from the training process's RNG
(the loader's seed comes from a private generator): a synchronous round leaves the training RNG where an
asynchronous one does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset

Batch = range | np.ndarray
"""The positions of one batch: a contiguous range (read as one slice) or an array of positions."""


@dataclass
class EncodedBatch:
    """Texts as encoder chunks: ``input_ids`` and ``attention_mask`` [B, C, L] (C = the longest text's chunk
    count in the batch) and ``keep``, the flat indices (into B x C) of the chunks holding real tokens, computed
    on the host so that dropping all-padding chunks needs no device-to-host sync."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    keep: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def pin_memory(self) -> EncodedBatch:
        return EncodedBatch(*(t.pin_memory() for t in (self.input_ids, self.attention_mask, self.keep)))

    def to(self, device: torch.device, *, non_blocking: bool = False) -> EncodedBatch:
        return EncodedBatch(
            *(
                t.to(device, non_blocking=non_blocking)
                for t in (self.input_ids, self.attention_mask, self.keep)
            )
        )


@dataclass
class TokenBatch:
    """Every token id of each text (``features: token_embeddings``): ``ids`` concatenated, ``lengths`` per text."""

    ids: torch.Tensor
    lengths: list[int]

    def __len__(self) -> int:
        return len(self.lengths)

    def pin_memory(self) -> TokenBatch:
        return TokenBatch(self.ids.pin_memory(), self.lengths)

    def to(self, device: torch.device, *, non_blocking: bool = False) -> TokenBatch:
        return TokenBatch(self.ids.to(device, non_blocking=non_blocking), self.lengths)


class Chunker:
    """Texts (or token-id arrays in the encoder's vocabulary) -> ``EncodedBatch`` or ``TokenBatch``. Holds the
    tokenizer and the chunk sizes only, so it pickles into loader workers without the encoder's weights."""

    def __init__(self, tokenizer, max_length: int, max_chunks: int) -> None:
        self.tokenizer, self.max_length, self.max_chunks = tokenizer, max_length, max_chunks

    def token_ids(self, items: Sequence) -> list[list[int]]:
        """Each item's token ids: a str is tokenised (no special tokens); an int array is already ids of this
        encoder's vocabulary (a pool read with ``pass_token_ids``) and is taken as it is."""
        items = list(items)
        if all(isinstance(t, str) for t in items):
            return self.tokenizer(items, add_special_tokens=False)["input_ids"] if items else []
        if any(isinstance(t, str) for t in items):
            raise TypeError("a batch mixes texts and token-id arrays: give one or the other")
        return [[int(x) for x in t] for t in items]

    def encode(self, items: Sequence) -> EncodedBatch:
        """Each text's first ``max_length - 2`` x ``max_chunks`` tokens in chunks wrapped in [CLS] ... [SEP]."""
        tok, body = self.tokenizer, self.max_length - 2
        chunked = []
        for t in self.token_ids(items):
            t = t[: body * self.max_chunks] or [tok.unk_token_id]
            chunked.append(
                [[tok.cls_token_id, *t[i : i + body], tok.sep_token_id] for i in range(0, len(t), body)]
            )
        c = max(len(x) for x in chunked)
        length = max(len(ch) for x in chunked for ch in x)
        input_ids = torch.full((len(chunked), c, length), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunked), c, length), dtype=torch.long)
        for b, x in enumerate(chunked):
            for k, ch in enumerate(x):
                input_ids[b, k, : len(ch)] = torch.tensor(ch)
                mask[b, k, : len(ch)] = 1
        keep = torch.tensor(
            [b * c + k for b, x in enumerate(chunked) for k in range(len(x))], dtype=torch.long
        )
        return EncodedBatch(input_ids, mask, keep)

    def tokens(self, items: Sequence) -> TokenBatch:
        ids = self.token_ids(items)
        flat = torch.tensor([x for t in ids for x in t], dtype=torch.long)
        return TokenBatch(flat, [len(t) for t in ids])


def spans(lo: int, hi: int, size: int) -> list[range]:
    """[lo, hi) in consecutive ranges of ``size`` (the last one shorter)."""
    return [range(s, min(s + size, hi)) for s in range(lo, hi, size)]


class _Batches(Dataset):
    """Item k: ``transform`` of the texts at ``positions[k]`` (empty positions give None)."""

    def __init__(self, texts: Sequence, positions: Sequence[Batch], transform: Callable) -> None:
        self.texts, self.positions, self.transform = texts, positions, transform

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int):
        p = self.positions[k]
        if len(p) == 0:
            return None
        items = self.texts[p.start : p.stop] if isinstance(p, range) else [self.texts[int(i)] for i in p]
        return self.transform(items)


_FORK = "fork" if "fork" in mp.get_all_start_methods() else None
"""Workers are forked even in a process that was itself spawned (an influence worker, a test's rank), where the
default start method is spawn: a spawned worker imports torch and transformers and rebuilds the pool, seconds
at every fit epoch and every prediction."""


def _one_thread(_: int) -> None:
    # Parallelism comes from the workers: one tokenizer thread each, never a Rust thread pool per worker.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def make_loader(
    texts: Sequence, positions: Sequence[Batch], transform: Callable, *, workers: int, device: torch.device,
    timeout_s: float,
) -> DataLoader:  # fmt: skip
    """The DataLoader behind ``batches``: one item per batch (``batch_size=None``), in order, pinned memory when
    ``device`` is CUDA; a worker silent for ``timeout_s`` fails the read."""
    return DataLoader(
        _Batches(texts, positions, transform),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        timeout=timeout_s if workers else 0,
        worker_init_fn=_one_thread if workers else None,
        generator=torch.Generator().manual_seed(0),  # the iterator's seed draw stays off the global RNG
        prefetch_factor=4 if workers else None,
        multiprocessing_context=_FORK if workers else None,
    )


def batches(
    texts: Sequence, positions: Sequence[Batch], transform: Callable, *, workers: int, device: torch.device,
    timeout_s: float = 1800.0,
) -> Iterator:  # fmt: skip
    """``transform(texts at positions[k])`` for every k in order, on ``device`` (None for an empty batch);
    ``workers`` > 0: read and transformed in that many forked worker processes while the caller computes."""
    cuda = device.type == "cuda"
    loader = make_loader(texts, positions, transform, workers=workers, device=device, timeout_s=timeout_s)
    for item in loader:
        yield None if item is None else item.to(device, non_blocking=cuda)

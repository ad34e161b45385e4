"""Training data from a Megatron indexed dataset through megatron-core's GPTDataset."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig


@dataclass(frozen=True)
class TokenizerInfo:
    """What GPTDataset needs of a tokenizer (it never tokenises: the corpus is pre-tokenised)."""

    vocab_size: int
    eod: int
    pad: int = -1
    path: str | None = None
    """Local tokenizer directory recorded by prepare (for the reference set); not part of the cache key."""

    @property
    def unique_identifiers(self) -> dict[str, int]:
        # GPTDataset hashes its config (tokenizer included) to key the index cache.
        return {"class": "TokenizerInfo", "vocab_size": self.vocab_size, "eod": self.eod, "pad": self.pad}

    @classmethod
    def from_meta(cls, prefix: str | Path) -> TokenizerInfo:
        """Read `{prefix}.meta.json`, written by `mates-megatron prepare`."""
        path = Path(f"{prefix}.meta.json")
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: prepare the data with `mates-megatron prepare` "
                "(it writes .bin, .idx and .meta.json side by side)"
            )
        meta = json.loads(path.read_text())
        return cls(vocab_size=int(meta["vocab_size"]), eod=int(meta["eod_id"]), path=meta.get("tokenizer"))


def build_gpt_dataset(
    prefix: str | Path,
    *,
    seq_length: int,
    num_samples: int,
    seed: int,
    tokenizer: TokenizerInfo,
    cache_dir: str | Path,
) -> GPTDataset:
    """megatron-core GPTDataset over one indexed dataset, all of it for training, indices cached on disk.

    Call on every rank: the index files are built deterministically from (prefix, seq_length, seed,
    num_samples), so every rank reads the same sample order.
    """
    prefix = str(prefix)
    for ext in (".bin", ".idx"):
        if not Path(prefix + ext).is_file():
            raise FileNotFoundError(
                f"{prefix}{ext} not found: run `mates-megatron prepare` to write the indexed dataset"
            )
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prefix], None),
        split="100,0,0",
        path_to_cache=str(cache_dir),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_samples, None, None], lambda: True, config
    ).build()
    return train


def sequential_indices(
    consumed_samples: int, *, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> list[np.ndarray]:
    """Sample indices of this rank's micro-batches for the global batch that starts at consumed_samples.

    Megatron's MegatronPretrainingSampler order: the global batch is split into contiguous per-rank blocks.
    """
    per_rank = global_batch_size // dp_size
    start = consumed_samples + dp_rank * per_rank
    idx = np.arange(start, start + per_rank)
    return [idx[i : i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]

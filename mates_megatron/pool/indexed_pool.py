"""Candidate pool over a Megatron indexed dataset (.bin/.idx) through megatron-core's GPTDataset.

Candidates are GPTDataset samples (seq_length + 1 tokens over concatenated documents), which is what a
Megatron-LM run already trains on; candidate id = GPTDataset index. A sample's domain is the domain of the
document it starts in (``PREFIX.domains.npy`` from `mates-megatron prepare`; unknown without it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import ClassVar

import numpy as np

from mates_megatron.pool.base import POOLS, PoolError

_FINGERPRINT_SPAN = 1 << 20
"""Bytes hashed at each end of the ``.idx`` and the ``.bin`` for the pool fingerprint."""


@POOLS.register("indexed")
class IndexedPool:
    """Wraps a GPTDataset the host built (the Megatron dataset its run trains on)."""

    host_dataset: ClassVar[bool] = True
    """Candidates are the host's own train dataset: the host sizes it and its loader reads from it."""
    decodes_text: ClassVar[bool] = True
    """Text comes from decoding token ids with the pretraining tokenizer."""

    @classmethod
    def check_config(cls, sel) -> None:
        return None

    @classmethod
    def from_config(cls, sel, *, num_samples: int, build_indexed_dataset, tokenizer=None, **_) -> IndexedPool:
        """``build_indexed_dataset(num_samples)``: the host's GPTDataset of at least ``num_samples``."""
        dataset = build_indexed_dataset(num_samples)
        return cls(dataset, dataset.dataset_path, tokenizer=tokenizer)

    def selection_store(self, run_name: str) -> None:
        """Selections of an indexed pool live in the checkpoint only."""
        return None

    def __init__(self, dataset, prefix: str | Path, *, tokenizer=None) -> None:
        self.dataset = dataset
        self.prefix = str(prefix)
        self._tokenizer = tokenizer
        if len(dataset) == 0:
            raise PoolError(f"indexed dataset {self.prefix} yields no samples: the pool is empty")
        dom_path = Path(f"{self.prefix}.domains.npy")
        self._doc_domain = np.load(dom_path) if dom_path.is_file() else None
        meta = Path(f"{self.prefix}.meta.json")
        import json

        self._domains = json.loads(meta.read_text()).get("domains", []) if meta.is_file() else []
        self._first_doc: np.ndarray | None = None
        self._fingerprint: str | None = None

    @property
    def num_candidates(self) -> int:
        return len(self.dataset)

    @property
    def domains(self) -> list[str]:
        return list(self._domains)

    def _sample_first_doc(self) -> np.ndarray:
        if self._first_doc is None:
            ds = self.dataset
            ds[0]  # GPTDataset memory-maps its index arrays lazily on first access
            shuffled = np.asarray(ds.shuffle_index)[: len(ds)]
            doc_pos = np.asarray(ds.sample_index)[shuffled, 0]
            self._first_doc = np.asarray(ds.document_index)[doc_pos].astype(np.int64)
        return self._first_doc

    def domain_ids(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if self._doc_domain is None:
            return np.full(ids.shape, -1, dtype=np.int16)
        return self._doc_domain[self._sample_first_doc()[ids]].astype(np.int16)

    def training_sample(self, gid: int) -> dict[str, np.ndarray]:
        s = self.dataset[int(gid)]
        return {k: np.asarray(s[k]) for k in ("tokens", "labels", "loss_mask", "position_ids")}

    def tokens(self, gid: int) -> np.ndarray:
        """The sample's seq_length input token ids."""
        return np.asarray(self.dataset[int(gid)]["tokens"])

    def text(self, gid: int) -> str:
        if self._tokenizer is None:
            raise PoolError(
                f"indexed pool {self.prefix} holds token ids: pass tokenizer= (the pretraining tokenizer) to decode text"
            )
        s = self.dataset[int(gid)]
        return self._tokenizer.decode(np.asarray(s["tokens"]).tolist())

    def fingerprint(self) -> str:
        """The sizes of ``.idx`` and ``.bin``, a hash of the first and last MiB of each (the ``.idx`` header
        with dtype and counts, the ends of its arrays; the first and last documents' tokens) and the sample
        count; computed once. Reading the whole files at every save and load does not scale to a paper pool,
        and an mtime would refuse a resume from a copy of the same data on another machine. A change in the
        middle of the ``.bin`` that keeps every document's length is not seen."""
        if self._fingerprint is None:
            h = hashlib.sha256(str(len(self.dataset)).encode())
            for path in (Path(f"{self.prefix}.idx"), Path(f"{self.prefix}.bin")):
                size = path.stat().st_size
                h.update(f":{size}:".encode())
                with path.open("rb") as f:
                    h.update(f.read(_FINGERPRINT_SPAN))
                    f.seek(max(size - _FINGERPRINT_SPAN, 0))
                    h.update(f.read(_FINGERPRINT_SPAN))
            self._fingerprint = "indexed:" + h.hexdigest()[:32]
        return self._fingerprint

    def __getitem__(self, gid: int) -> dict[str, np.ndarray]:
        return self.training_sample(gid)

    def __len__(self) -> int:
        return self.num_candidates

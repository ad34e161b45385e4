"""Candidate pool over a Megatron indexed dataset (.bin/.idx) through megatron-core's GPTDataset.

Candidates are GPTDataset samples (seq_length + 1 tokens over concatenated documents), which is what a
Megatron-LM run already trains on; candidate id = GPTDataset index. A sample's domain is the domain of the
document it starts in (``PREFIX.domains.npy`` from `mates-megatron prepare`; unknown without it).

The pool pickles as what rebuilds its GPTDataset (``GPTDatasetRecipe``: the constructor's arguments, the
split's documents as a range), never its document/sample/shuffle index arrays (12 bytes and more a sample:
about 2 GB at 128M samples): the copy memory-maps the same files in Megatron's index cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mates_megatron.pool.base import POOLS, PoolBase, PoolError, identity_digest, refuse_if_changed

_FINGERPRINT_SPAN = 1 << 20
"""Bytes hashed at each end of the ``.idx`` and the ``.bin`` for the pool fingerprint."""
_INDEX_PROBES = 1024
"""Entries of each index array, evenly spaced, that a rebuilt GPTDataset must read as its original did."""
_INDEX_ARRAYS = ("document_index", "sample_index", "shuffle_index")


def _index_arrays(ds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A GPTDataset's document, sample and shuffle index (memory-maps them where Megatron defers it)."""
    if ds.shuffle_index is None:
        ds[0]  # defer_npy_index_mmap: GPTDataset maps its index files on first access
    return ds.document_index, ds.sample_index, ds.shuffle_index


def _index_digest(ds) -> str:
    """Shapes, dtypes and evenly spaced entries of the index arrays: a cache file that is not the one the
    original read is found without reading 2 GB."""
    h = hashlib.sha256()
    for arr in _index_arrays(ds):
        at = np.unique(np.linspace(0, len(arr) - 1, _INDEX_PROBES).astype(np.int64))
        h.update(f"{arr.shape}{arr.dtype.str}".encode())
        h.update(np.ascontiguousarray(arr[at]).tobytes())
    return h.hexdigest()[:32]


def _index_cache_files(ds) -> tuple[str, ...]:
    """The files GPTDataset reads its indices from, by megatron-core's own naming rule
    (``GPTDataset._build_document_sample_shuffle_indices``, the same in core_v0.16.1 and core_v0.19.0)."""
    if getattr(ds.config, "defer_npy_index_mmap", False):
        return tuple(getattr(ds, f"path_to_{name}") for name in _INDEX_ARRAYS)
    cache = ds.config.path_to_cache
    if cache is None and not ds.config.mock:
        cache = os.path.join(ds.dataset.path_prefix, "cache", f"{type(ds).__name__}_indices")
    if cache is None:
        raise PoolError(
            f"the GPTDataset over {ds.dataset_path} keeps its indices in memory only (mock data, no "
            "path_to_cache): the pool cannot be sent to another process without copying them; give it an index "
            "cache (GPTDatasetConfig.path_to_cache, Megatron-LM --data-cache-path)"
        )
    base = f"{ds.unique_description_hash}-{type(ds).__name__}-{ds.index_split.name}"
    # Without the description file megatron-core counts a cache miss and builds the indices again.
    names = ("description.txt", *(f"{name}.npy" for name in _INDEX_ARRAYS))
    return tuple(os.path.join(cache, f"{base}-{name}") for name in names)


@dataclass(frozen=True)
class GPTDatasetRecipe:
    """What rebuilds a megatron-core GPTDataset in another process, pickled in its place.

    ``build`` calls the dataset's own constructor with the original arguments, so it finds its indices in
    Megatron's index cache and memory-maps them (megatron-core would build and write them again on a cache
    miss: a missing cache file is refused first). Cost of a rebuild: opening the ``.idx`` (memory-mapped),
    three ``numpy.load(mmap_mode="r")`` and ``_INDEX_PROBES`` reads of each array; no array is read whole.
    """

    dataset_class: type
    """The dataset's class (GPTDataset or a subclass with its constructor)."""
    low_level: Any
    """Its IndexedDataset, which pickles as its path prefix and settings (megatron-core's ``__getstate__``)."""
    dataset_path: str | None
    """The ``dataset_path`` argument."""
    indices: tuple[int, int, str] | np.ndarray
    """The split's document indices: (start, stop, dtype) of a range (what Megatron's builder makes), else
    the array."""
    num_samples: int | None
    """The ``num_samples`` argument."""
    index_split: Any
    """The ``index_split`` argument (megatron.core.datasets.utils.Split)."""
    config: Any
    """The GPTDatasetConfig (the tokenizer it holds travels with it)."""
    cache_files: tuple[str, ...]
    """The index cache files the dataset reads."""
    index_digest: str
    """``_index_digest`` of the original."""

    @classmethod
    def of(cls, ds) -> GPTDatasetRecipe:
        files = _index_cache_files(ds)
        _require_files(files)
        return cls(
            dataset_class=type(ds),
            low_level=ds.dataset,
            dataset_path=ds.dataset_path,
            indices=_as_range(ds.indices),
            num_samples=ds.num_samples,
            index_split=ds.index_split,
            config=ds.config,
            cache_files=files,
            index_digest=_index_digest(ds),
        )

    def build(self):
        _require_files(self.cache_files)
        indices = self.indices
        if isinstance(indices, tuple):
            indices = np.arange(indices[0], indices[1], dtype=np.dtype(indices[2]))
        ds = self.dataset_class(
            self.low_level, self.dataset_path, indices, self.num_samples, self.index_split, self.config
        )
        if _index_digest(ds) != self.index_digest:
            raise PoolError(
                f"the GPTDataset index cache {os.path.dirname(self.cache_files[0])} holds other indices than "
                "when the pool was pickled (rebuilt in between?): a pool must not change while a run reads it; "
                "restore the cache, or restart the run"
            )
        return ds


def _as_range(indices: np.ndarray) -> tuple[int, int, str] | np.ndarray:
    n = len(indices)
    if n and int(indices[-1]) - int(indices[0]) == n - 1 and (n == 1 or bool(np.all(np.diff(indices) == 1))):
        return int(indices[0]), int(indices[-1]) + 1, indices.dtype.str
    return indices


def _require_files(files: tuple[str, ...]) -> None:
    for path in files:
        if not os.path.isfile(path):
            raise PoolError(
                f"GPTDataset index cache {path} is missing: a pickled indexed pool is rebuilt from Megatron's index "
                "cache; keep it (path_to_cache / --data-cache-path) until the run ends"
            )


@POOLS.register("indexed")
class IndexedPool(PoolBase):
    """Wraps a GPTDataset the host built (the Megatron dataset its run trains on)."""

    host_dataset: ClassVar[bool] = True
    """Candidates are the host's own train dataset: the host sizes it and its loader reads from it."""
    decodes_text: ClassVar[bool] = True
    """Text comes from decoding token ids with the pretraining tokenizer."""

    @classmethod
    def from_config(
        cls, config, *, num_samples: int, build_indexed_dataset, tokenizer=None, **_
    ) -> IndexedPool:
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
        self._doc_domain = _doc_domains(self.prefix)
        meta = Path(f"{self.prefix}.meta.json")
        self._domains = json.loads(meta.read_text()).get("domains", []) if meta.is_file() else []
        self._fingerprint: str | None = None

    @property
    def num_candidates(self) -> int:
        return len(self.dataset)

    @property
    def domains(self) -> list[str]:
        return list(self._domains)

    def domain_ids(self, ids: np.ndarray) -> np.ndarray:
        """The domain of the document each sample starts in, read for ``ids`` only (a whole-pool table would
        be 8 bytes a sample in every process)."""
        ids = np.asarray(ids)
        if self._doc_domain is None:
            return np.full(ids.shape, -1, dtype=np.int16)
        document_index, sample_index, shuffle_index = _index_arrays(self.dataset)
        first_doc = document_index[sample_index[shuffle_index[ids], 0]]
        return np.asarray(self._doc_domain[first_doc], dtype=np.int16)

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

    def _identity(self) -> str:
        """The fingerprint and the per-document domains: what a pickled copy must find unchanged."""
        domains = np.ascontiguousarray(
            self._doc_domain if self._doc_domain is not None else [], dtype=np.int16
        )
        return f"{self.fingerprint()}|{self._domains}|{hashlib.sha256(domains).hexdigest()}"

    def __getstate__(self) -> dict:
        """The prefix, tokenizer and domain names, and the GPTDataset as a ``GPTDatasetRecipe``; not its index
        arrays nor the per-document domains (read again from ``PREFIX.domains.npy``). Another dataset (an
        IndexedDataset pickles as its path already) is pickled as it is."""
        from megatron.core.datasets.gpt_dataset import GPTDataset

        state = {k: v for k, v in self.__dict__.items() if k not in ("dataset", "_doc_domain")}
        state["dataset"] = (
            GPTDatasetRecipe.of(self.dataset) if isinstance(self.dataset, GPTDataset) else self.dataset
        )
        state["_identity"] = identity_digest(self._identity())
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        identity = state.pop("_identity")
        dataset = state.pop("dataset")
        self.__dict__.update(state)
        self.dataset = dataset.build() if isinstance(dataset, GPTDatasetRecipe) else dataset
        self._doc_domain = _doc_domains(self.prefix)
        self._fingerprint = None  # from the files as they are now
        refuse_if_changed(f"indexed pool {self.prefix}", identity, identity_digest(self._identity()))


def _doc_domains(prefix: str) -> np.ndarray | None:
    """int16 domain of each document (``PREFIX.domains.npy``, memory-mapped), or None without the file."""
    path = Path(f"{prefix}.domains.npy")
    return np.load(path, mmap_mode="r") if path.is_file() else None

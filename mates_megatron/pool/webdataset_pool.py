"""Candidate pool over WebDataset tar shards (as `mates-megatron prepare` writes them), read in place.

Each tar sample (key K: K.txt, K.json with {"id", "domain"}, K.ids.npy with int32 token ids) is one
candidate. Random access (the sampler and the round's scorers) uses an offset index built once per shard
with tarfile (keys split with webdataset's own ``base_plus_ext`` naming rule). At start-up each shard's
existence and size are checked against the manifest, and its tar headers and small .json members are
indexed; its sha256 is verified when it is first read, once per node (``ShardStamps``: hashing every shard
on every rank at start-up, or in every loader worker of every round, does not scale to a paper pool).

Reads use ``os.pread`` on the shard's descriptor: DataLoader workers are forked with the descriptors open,
and a seek then read on a shared file offset would race between them. The pool pickles as its directory and
settings; the copy indexes the shards again (the per-sample offsets are not carried).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import ClassVar

import numpy as np
from webdataset.tariterators import base_plus_ext

from mates_megatron.pool.base import POOLS, DocumentPool, PoolError, identity_digest, refuse_if_changed
from mates_megatron.pool.manifest import SelectionStore, ShardStamps, check_shard, read_manifest, verify_shard
from mates_megatron.pool.options import WebDatasetPoolConfig

_FIX_CORRUPT = "re-create it with `mates-megatron prepare` or restore it from its source"


@POOLS.register("webdataset")
class WebDatasetPool(DocumentPool):
    """A pool over the shards listed in ``shards_dir/manifest.json``; candidate id = the sample's "id"."""

    host_dataset: ClassVar[bool] = False
    decodes_text: ClassVar[bool] = False

    Config: ClassVar[type] = WebDatasetPoolConfig

    @classmethod
    def from_config(
        cls, config: WebDatasetPoolConfig, *, seq_length: int, tokenizer=None, **_
    ) -> WebDatasetPool:
        return cls(config.shards, seq_length=seq_length)

    def selection_store(self, run_name: str) -> SelectionStore:
        """Where this run's selections are written beside the shards (the corpus is never rewritten)."""
        return SelectionStore(self.dir, run_name)

    def __init__(
        self,
        shards_dir: str | Path,
        *,
        seq_length: int,
        pad_id: int = 0,
        tokenizer=None,
        stamp_dir: str | Path | None = None,
    ) -> None:
        """``stamp_dir``: where this node records the shards it has verified (default: ``default_stamp_dir()``,
        under TMPDIR)."""
        self.dir = Path(shards_dir)
        self.seq_length = seq_length
        self.pad_id = pad_id
        self._tokenizer = tokenizer
        self._stamps = ShardStamps(stamp_dir)
        self._entries = read_manifest(self.dir)
        # Per-candidate (offset, size) of its .ids.npy and .txt members, and its domain index.
        n = sum(int(e["num_samples"]) for e in self._entries)
        if n == 0:
            raise PoolError(
                f"every shard in {self.dir} is empty: the pool has no candidates; prepare data into it"
            )
        self._n = n
        self._shard = np.empty(n, dtype=np.int32)
        self._ids_off = np.empty((n, 2), dtype=np.int64)
        self._txt_off = np.empty((n, 2), dtype=np.int64)
        self._domain = np.empty(n, dtype=np.int16)
        self._domains: list[str] = []
        seen = np.zeros(n, dtype=bool)
        for si, entry in enumerate(self._entries):
            path = check_shard(self.dir, entry)  # sha256 on the shard's first read (``_read``), not here
            try:
                count = self._index_shard(si, path, seen)
            except PoolError:
                verify_shard(self.dir, entry)  # a changed shard is named as changed, not as corrupt
                raise
            if count == 0:
                raise PoolError(
                    f"shard {path} holds no samples; remove it from {self.dir} and re-run prepare"
                )
            if count != int(entry["num_samples"]):
                raise PoolError(
                    f"shard {path} holds {count} samples, the manifest says {entry['num_samples']}; "
                    "re-run `mates-megatron prepare` to rebuild the shards and manifest"
                )
        if not seen.all():
            raise PoolError(
                f"candidate ids in {self.dir} are not 0..{n - 1}: ids {np.flatnonzero(~seen)[:5]} missing"
            )
        self._files: dict[int, io.FileIO] = {}
        """Open shards, each verified when first opened here (a forked worker inherits its parent's, and
        reads them with pread: no shared offset)."""

    def _index_shard(self, si: int, path: Path, seen: np.ndarray) -> int:
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(path, "r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = base_plus_ext(m.name)
                    if key is None:
                        continue
                    members.setdefault(key, {})[ext] = m
                # Samples carry their metadata in K.json: read it now (it is small).
                count = 0
                for key, fields in members.items():
                    for required in ("json", "ids.npy", "txt"):
                        if required not in fields:
                            what = "text (.txt)" if required == "txt" else required
                            raise PoolError(
                                f"shard {path}: sample {key!r} has no {what}; every sample needs .txt, .json "
                                f"and .ids.npy; {_FIX_CORRUPT}"
                            )
                    try:
                        meta = json.loads(tf.extractfile(fields["json"]).read())
                    except ValueError as e:
                        raise PoolError(
                            f"shard {path}: sample {key!r} has unreadable .json ({e}); {_FIX_CORRUPT}"
                        ) from e
                    gid = int(meta["id"])
                    if not 0 <= gid < len(seen) or seen[gid]:
                        raise PoolError(
                            f"shard {path}: sample {key!r} has id {gid}, out of range or duplicated"
                        )
                    seen[gid] = True
                    self._shard[gid] = si
                    self._ids_off[gid] = (fields["ids.npy"].offset_data, fields["ids.npy"].size)
                    self._txt_off[gid] = (fields["txt"].offset_data, fields["txt"].size)
                    self._domain[gid] = self._domain_index(meta.get("domain"))
                    count += 1
                return count
        except (tarfile.TarError, EOFError, OSError) as e:
            raise PoolError(f"shard {path} is corrupt or truncated ({e}); {_FIX_CORRUPT}") from e

    # -- CandidatePool ------------------------------------------------------------------------------------
    @property
    def num_candidates(self) -> int:
        return self._n

    @property
    def domains(self) -> list[str]:
        return list(self._domains)

    def domain_ids(self, ids: np.ndarray) -> np.ndarray:
        return self._domain[np.asarray(ids)]

    def _shard_file(self, si: int) -> io.FileIO:
        f = self._files.get(si)
        if f is None:
            entry = self._entries[si]
            path = check_shard(self.dir, entry)
            f = open(path, "rb", buffering=0)  # noqa: SIM115 - kept open for the pool's life
            try:
                self._stamps.verify(path, entry["sha256"], f)
            except BaseException:
                f.close()
                raise
            self._files[si] = f
        return f

    def _read(self, gid: int, where: np.ndarray) -> bytes:
        si = int(self._shard[gid])
        off, size = where[gid]
        data = os.pread(self._shard_file(si).fileno(), int(size), int(off))
        if len(data) != size:
            raise PoolError(f"shard {self.dir / self._entries[si]['name']} is truncated; {_FIX_CORRUPT}")
        return data

    def tokens(self, gid: int) -> np.ndarray:
        return np.load(io.BytesIO(self._read(gid, self._ids_off)))

    def text(self, gid: int) -> str:
        return self._read(gid, self._txt_off).decode("utf-8")

    def fingerprint(self) -> str:
        return "wds:" + ",".join(e["sha256"][:16] for e in self._entries)

    def __getstate__(self) -> dict:
        """The directory and settings, and a digest of the fingerprint to check the rebuild against; not the
        per-sample offsets (38 bytes a candidate) nor the open shards."""
        return {
            "shards_dir": self.dir,
            "seq_length": self.seq_length,
            "pad_id": self.pad_id,
            "tokenizer": self._tokenizer,
            "stamp_dir": self._stamps.dir,
            "identity": identity_digest(self.fingerprint()),
        }

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        identity = state.pop("identity")
        self.__init__(state.pop("shards_dir"), **state)
        refuse_if_changed(f"WebDataset pool {self.dir}", identity, identity_digest(self.fingerprint()))

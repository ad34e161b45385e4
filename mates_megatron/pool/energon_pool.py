"""Candidate pool over a Megatron-Energon prepared WebDataset, read in place through Energon's own index.

`energon prepare PATH` leaves, beside the tars it never rewrites, ``PATH/.nv-meta/`` (``.info.json``: shard
-> sample count; ``split.yaml``: split -> shards, and excluded shards or samples; ``dataset.yaml``: the
sample type and its ``field_map`` or ``sample_loader``; ``index.sqlite``: sample key -> shard, index and byte
ranges) and ``SHARD.tar.idx`` (the byte offset of every sample in SHARD). This pool reads that index with
Energon's classes: ``get_dataset_from_config`` gives the split's shards (Energon's ``WebdatasetMeta``) and
the sample decoding that ``dataset.yaml`` declares, ``ShardInfosITarReader`` reads sample i of the split by
random access, ``SqliteIndexReader`` locates excluded samples by key, and Energon's field syntax
(``json[domain]``) reads a domain. Nothing is re-indexed or written beside the data except this run's
selections (``PATH/mates/RUN_NAME/``).

Candidates are the split's samples in Energon's order (the split's shards as ``split.yaml`` lists them,
samples in tar order, excluded ones left out): candidate id = position in that order. Each candidate is one
document: its text (``text_field``) is tokenised with the pretraining tokenizer as `mates-megatron prepare`
does (no special tokens, end-of-document id appended) and its first seq_length + 1 tokens are one training
sequence, as in the WebDataset pool.

Pickled as its root and settings (a fingerprint digest checks the copy); the copy reads its domains only if
asked (an influence worker never is).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mates_megatron.data.tokenizer import eod_token_id
from mates_megatron.pool.base import POOLS, DocumentPool, PoolError, identity_digest, refuse_if_changed
from mates_megatron.pool.manifest import SelectionStore
from mates_megatron.pool.options import EnergonPoolConfig

SHARD_DOMAIN = "__shard__"
"""``domain_field`` value that makes each shard its own domain (shards laid out one source per shard)."""

_FIX_PREPARE = "re-run `energon prepare {root}` (or `energon prepare --tar-index-only {root}`)"


def require_energon() -> None:
    """Import megatron-energon or say how to install it (an optional extra)."""
    try:
        import megatron.energon  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"pool 'energon' needs megatron-energon ({e}): pip install 'mates-megatron[energon]'"
        ) from e


@POOLS.register("energon")
class EnergonPool(DocumentPool):
    """A pool over one split of the Energon-prepared dataset at ``path`` (``pool.shards``)."""

    host_dataset: ClassVar[bool] = False
    decodes_text: ClassVar[bool] = False
    tokenizes_text: ClassVar[bool] = True
    """Candidates are text, tokenised here with the pretraining tokenizer: hosts always pass it."""

    Config: ClassVar[type] = EnergonPoolConfig

    @classmethod
    def check_config(cls, config: EnergonPoolConfig) -> None:
        require_energon()

    @classmethod
    def from_config(cls, config: EnergonPoolConfig, *, seq_length: int, tokenizer=None, **_) -> EnergonPool:
        return cls(
            config.shards,
            seq_length=seq_length,
            tokenizer=tokenizer,
            split=config.split,
            text_field=config.text_field,
            domain_field=config.domain_field,
        )

    def selection_store(self, run_name: str) -> SelectionStore:
        """Where this run's selections are written beside the shards (the corpus is never rewritten)."""
        return SelectionStore(self.root, run_name)

    def __init__(
        self,
        path: str | Path,
        *,
        seq_length: int,
        tokenizer,
        split: str = "train",
        text_field: str = "text",
        domain_field: str | None = None,
        pad_id: int = 0,
    ) -> None:
        self._open(path, seq_length, tokenizer, split, text_field, domain_field, pad_id)
        self._domain_table()  # a missing domain field is named now, not at the first round

    def _open(self, path, seq_length, tokenizer, split, text_field, domain_field, pad_id) -> None:
        """Everything but the domains, which read a part of every sample (``_domain_table``)."""
        require_energon()
        self.root = Path(path)
        self.seq_length = seq_length
        self.split = split
        self.text_field = text_field
        self.domain_field = domain_field
        self.pad_id = pad_id
        if tokenizer is None:
            raise PoolError(
                f"Energon pool {self.root} holds text: pass tokenizer= (the pretraining tokenizer) to "
                "tokenise it into training sequences"
            )
        self._tokenizer = tokenizer
        self._eod = eod_token_id(tokenizer)
        self._check_prepared()
        factory = self._build_factory()
        self._shards = [(s.name, int(s.count)) for s in factory.shards]
        self._starts = np.cumsum([0] + [c for _, c in self._shards])
        """Energon position of each shard's first sample in the split."""
        self._check_shards()
        self._positions = self._kept_positions(factory.sample_excludes)
        self._n = len(self._positions) if self._positions is not None else int(self._starts[-1])
        if self._n == 0:
            raise PoolError(
                f"split {split!r} of {self.root} has no samples after its excludes: the pool is empty"
            )
        self._fingerprint: str | None = None
        self._text(0)  # a missing or non-text field is named now, not at the first training step
        self._domains: list[str] = []
        self._domain: np.ndarray | None = None

    def _domain_table(self) -> np.ndarray:
        """int16 domain index per candidate, read once (after unpickling: when first asked for)."""
        if self._domain is None:
            self._domains = []
            self._domain = self._read_domains()
        return self._domain

    # -- Energon's index ----------------------------------------------------------------------------------
    def _epath(self):
        from megatron.energon.epathlib import EPath

        return EPath(self.root)

    def _check_prepared(self) -> None:
        from megatron.energon.flavors.webdataset.metadata import EnergonDatasetType, get_dataset_type

        kind = get_dataset_type(self._epath()) if self.root.exists() else EnergonDatasetType.INVALID
        if kind != EnergonDatasetType.WEBDATASET:
            raise PoolError(
                f"{self.root} is not an Energon-prepared WebDataset (no .nv-meta/.info.json; Energon sees "
                f"{kind.value}): run `energon prepare {self.root}` on the directory of tar shards, or point "
                "pool.shards at the dataset's root"
            )

    def _split_parts(self) -> dict[str, list[str]]:
        from megatron.energon.eyaml import load_yaml_json
        from megatron.energon.flavors.webdataset.structs import WebdatasetSplits
        from megatron.energon.typed_converter import JsonParser

        meta = self._epath() / ".nv-meta"
        for name in ("split.yaml", "split.json"):
            if (meta / name).is_file():
                parsed = JsonParser(strict=True).raw_to_typed(load_yaml_json(meta / name), WebdatasetSplits)
                return parsed.split_parts
        raise PoolError(
            f"{self.root}/.nv-meta has no split.yaml: re-run `energon prepare {self.root}` with --split-parts "
            "or --split-ratio (not --tar-index-only)"
        )

    def _build_factory(self):
        """Energon's dataset factory for the split: its shards (with split.yaml's excludes applied) and the
        decoding that dataset.yaml declares. Built again after unpickling (it holds lambdas)."""
        from megatron.energon import WorkerConfig
        from megatron.energon.dataset_config import get_dataset_from_config
        from megatron.energon.flavors.webdataset.empty_dataset_error import EmptyDatasetError

        parts = self._split_parts()
        if self.split not in parts:
            raise PoolError(
                f"{self.root}/.nv-meta/split.yaml has no split {self.split!r} (it has "
                f"{', '.join(sorted(parts)) or 'none'}): set pool.split to one of them, or re-run "
                f"`energon prepare {self.root}` with --split-parts '{self.split}:PATTERN'"
            )
        if not (self.root / ".nv-meta" / "dataset.yaml").is_file():
            raise PoolError(
                f"{self.root}/.nv-meta/dataset.yaml not found: Energon needs it to decode samples; re-run "
                f'`energon prepare {self.root} --sample-type TextSample --field-map \'{{"text": "txt"}}\'` '
                "(or write it by hand)"
            )
        try:
            return get_dataset_from_config(
                self._epath(),
                split_part=self.split,
                training=False,
                worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
            )
        except EmptyDatasetError as e:
            raise PoolError(
                f"split {self.split!r} of {self.root} has no shards ({e}): the pool is empty"
            ) from e
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            raise PoolError(
                f"{self.root}/.nv-meta cannot be loaded by Energon ({type(e).__name__}: {e}); re-run "
                f"`energon prepare {self.root}` or fix dataset.yaml / split.yaml"
            ) from e

    def _idx_path(self, name: str) -> Path:
        from megatron.energon.flavors.webdataset.itar import ITAR_SUFFIX

        return (self.root / name).with_suffix(ITAR_SUFFIX)

    def _check_shards(self) -> None:
        """Cheap start-up checks: each tar exists, its .tar.idx holds count + 1 offsets and the tar reaches
        the last of them (a tar replaced or truncated since `energon prepare` is found before training)."""
        from megatron.energon.flavors.webdataset.itar import TarIndexReader

        fix = _FIX_PREPARE.format(root=self.root)
        for name, count in self._shards:
            tar = self.root / name
            if not tar.is_file():
                raise PoolError(f"shard {tar} of split {self.split!r} is missing; restore it or {fix}")
            if not self._idx_path(name).is_file():
                raise PoolError(f"shard {tar} has no Energon index {self._idx_path(name).name}; {fix}")
            with TarIndexReader(self._epath() / name) as idx:
                if len(idx) != count + 1:
                    raise PoolError(
                        f"shard {tar}: its .tar.idx indexes {len(idx) - 1} samples, .nv-meta/.info.json says "
                        f"{count}; {fix}"
                    )
                if tar.stat().st_size < idx[count]:
                    raise PoolError(
                        f"shard {tar} is shorter than its .tar.idx says (truncated or replaced since it was "
                        f"prepared); restore it or {fix}"
                    )

    def _kept_positions(self, sample_excludes: set[str]) -> np.ndarray | None:
        """Energon positions of the candidates when split.yaml excludes single samples ("SHARD/KEY"), found
        through Energon's sqlite index; None when it excludes none (candidate id = Energon position)."""
        if not sample_excludes:
            return None
        from megatron.energon.flavors.webdataset.indexing import SqliteIndexReader

        shard_of = {name: i for i, (name, _) in enumerate(self._shards)}
        dropped = []
        with SqliteIndexReader(self._epath() / ".nv-meta" / "index.sqlite") as db:
            for entry in sorted(sample_excludes):
                name = next((n for n in shard_of if entry.startswith(n + "/")), None)
                if name is None:
                    continue  # a sample of a shard outside this split
                try:
                    pointer = db.get_sample_pointer_by_key(entry[len(name) + 1 :])
                except KeyError:
                    continue  # not in the index: Energon's loader skips nothing for it either
                offsets = np.fromfile(self._idx_path(name), dtype="<u8")
                index = int(np.searchsorted(offsets, pointer.byte_offset))
                dropped.append(int(self._starts[shard_of[name]]) + index)
        keep = np.ones(int(self._starts[-1]), dtype=bool)
        keep[dropped] = False
        return np.flatnonzero(keep).astype(np.int64)

    def _energon(self) -> tuple[Any, Any]:
        """(factory, reader) of this process; rebuilt after unpickling or a fork (open tar handles and
        Energon's lambdas are neither picklable nor safe to share with a forked DataLoader worker)."""
        state = self.__dict__.get("_live")
        if state is None or state[0] != os.getpid():
            from megatron.energon.flavors.webdataset.itar_reader import ShardInfosITarReader

            factory = self._build_factory()
            reader = ShardInfosITarReader(self._epath(), factory.shards, part_filter=factory.part_filter)
            state = self._live = (os.getpid(), factory, reader)
        return state[1], state[2]

    def _position(self, gid: int) -> int:
        if not 0 <= gid < self._n:
            raise IndexError(f"candidate {gid} is out of range (the pool has {self._n})")
        return int(self._positions[gid]) if self._positions is not None else gid

    def _where(self, position: int) -> str:
        si = int(np.searchsorted(self._starts, position, side="right")) - 1
        return f"sample {position - int(self._starts[si])} of shard {self.root / self._shards[si][0]}"

    def _sample(self, gid: int):
        """The Energon sample (decoded as dataset.yaml says) of candidate ``gid``."""
        factory, reader = self._energon()
        position = self._position(gid)
        try:
            return factory.load_sample(reader[position])
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise PoolError(
                f"{self._where(position)} cannot be read by Energon ({type(e).__name__}: {e}); restore the "
                f"shard or {_FIX_PREPARE.format(root=self.root)}"
            ) from e

    def _text(self, gid: int) -> str:
        sample = self._sample(gid)
        if isinstance(sample, dict):  # CrudeWebdataset: the parts, in Energon's field syntax
            from megatron.energon.flavors.webdataset.field_access import field_access, split_field_access

            try:
                value = field_access(sample, split_field_access(self.text_field))
            except Exception:  # noqa: BLE001 - FieldAccessError, KeyError, IndexError
                value = None
            have = sorted(k for k in sample if not k.startswith("__"))
        else:
            value = getattr(sample, self.text_field, None)
            have = sorted(f.name for f in dataclasses.fields(sample) if not f.name.startswith("__"))
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if not isinstance(value, str):
            raise PoolError(
                f"{self._where(self._position(gid))}: the {type(sample).__name__} has no text field "
                f"{self.text_field!r} (it has {', '.join(have)}); set pool.text_field to the one "
                f"holding the document's text, or map it in {self.root}/.nv-meta/dataset.yaml (field_map)"
            )
        return value

    def _read_domains(self) -> np.ndarray:
        """int16 domain index per candidate, names in first-seen order (the same on every rank and resume);
        reads only the domain's tar part of each sample (a part filter), never the corpus' text."""
        if self.domain_field is None:
            return np.full(self._n, -1, dtype=np.int16)
        positions = self._positions if self._positions is not None else np.arange(self._n)
        if self.domain_field == SHARD_DOMAIN:
            shard = np.searchsorted(self._starts, positions, side="right") - 1
            return np.asarray([self._domain_index(self._shards[s][0]) for s in shard], dtype=np.int16)

        from megatron.energon.flavors.webdataset.field_access import field_access, split_field_access
        from megatron.energon.flavors.webdataset.itar_reader import ShardInfosITarReader
        from megatron.energon.flavors.webdataset.sample_decoder import DEFAULT_DECODER

        spec = split_field_access(self.domain_field)
        parts = {option[0] for option in spec}
        factory, _ = self._energon()
        reader = ShardInfosITarReader(self._epath(), factory.shards, part_filter=parts.__contains__)
        out = np.empty(self._n, dtype=np.int16)
        try:
            for gid, position in enumerate(positions):
                try:
                    value = field_access(DEFAULT_DECODER(reader[int(position)]), spec)
                except Exception as e:  # noqa: BLE001 - FieldAccessError, KeyError, decoder errors
                    raise PoolError(
                        f"{self._where(int(position))} has no domain field {self.domain_field!r} ({e}); set "
                        f"pool.domain_field to a part every sample has (Energon's field syntax, "
                        f"e.g. 'json[domain]'), '{SHARD_DOMAIN}' (one domain per shard) or null (unknown)"
                    ) from e
                if isinstance(value, bytes):
                    value = value.decode("utf-8")
                out[gid] = self._domain_index(str(value).strip())
        finally:
            reader.close()
        return out

    # -- CandidatePool ------------------------------------------------------------------------------------
    @property
    def num_candidates(self) -> int:
        return self._n

    @property
    def domains(self) -> list[str]:
        self._domain_table()
        return list(self._domains)

    def domain_ids(self, ids: np.ndarray) -> np.ndarray:
        return self._domain_table()[np.asarray(ids)]

    def text(self, gid: int) -> str:
        return self._text(int(gid))

    def tokens(self, gid: int) -> np.ndarray:
        """The document's token ids in the pretraining tokenizer, end-of-document id appended."""
        ids = self._tokenizer(self._text(int(gid)), add_special_tokens=False)["input_ids"]
        return np.asarray([*ids, self._eod], dtype=np.int32)

    def fingerprint(self) -> str:
        """A hash of Energon's index of the split: dataset.yaml, the split, its shards' names, counts and
        sizes, their .tar.idx (every sample's byte offset), the excluded samples and the fields read; computed
        once. Re-preparing identical shards keeps it (index.uuid, new at every prepare, is left out); an edit
        inside a sample that keeps every sample's size is not seen."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update((self.root / ".nv-meta" / "dataset.yaml").read_bytes())
            h.update(repr((self.split, self.text_field, self.domain_field)).encode())
            for name, count in self._shards:
                h.update(f"|{name}:{count}:{(self.root / name).stat().st_size}:".encode())
                h.update(self._idx_path(name).read_bytes())
            if self._positions is not None:
                h.update(self._positions.tobytes())
            self._fingerprint = "energon:" + h.hexdigest()[:32]
        return self._fingerprint

    def __getstate__(self) -> dict:
        """The dataset's root and settings, and a digest of the fingerprint to check the rebuild against; not
        the per-sample domains and kept positions, nor the open tars and Energon's lambdas (not picklable)."""
        settings = {
            k: getattr(self, k) for k in ("seq_length", "split", "text_field", "domain_field", "pad_id")
        }
        identity = identity_digest(self.fingerprint())
        return {**settings, "path": self.root, "tokenizer": self._tokenizer, "identity": identity}

    def __setstate__(self, state: dict) -> None:
        # The domains are read again only if asked for: a worker that reads text never is.
        self._open(**{k: v for k, v in state.items() if k != "identity"})
        refuse_if_changed(f"Energon pool {self.root}", state["identity"], identity_digest(self.fingerprint()))

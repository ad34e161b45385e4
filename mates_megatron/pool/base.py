"""Candidate pools: one protocol over Megatron indexed datasets and WebDataset tar shards.

A candidate is one training sequence with a stable global id (0 .. num_candidates-1), its domain when
known, and its text for the influence model. A pool is split into rounds by ``PoolRounds``: round r selects
from its own slice of a seeded permutation of the ids, so no round depends on shard sizes or boundaries.

A pool crosses into another process (a spawned influence worker; a DataLoader worker under spawn) pickled as
what rebuilds it: its files and settings, never its per-sample arrays, so that the pickle stays the same
size at 128M samples as at 100; the rebuilt copy refuses data that changed in between (``refuse_if_changed``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from mates_megatron.component import Component
from mates_megatron.registry import Registry


class PoolError(ValueError):
    """Bad pool input (corrupt, empty or changed shard, missing field); the message names file and fix."""


@runtime_checkable
class CandidatePool(Protocol):
    """What the sampler, the probes and the scorers need of a pool. Register a backend in ``POOLS`` with a
    ``from_config(config, *, num_samples, seq_length, build_indexed_dataset, tokenizer)`` classmethod (``config``:
    its own ``Config``, or None), deriving from ``PoolBase`` (which declares its capabilities)."""

    def __len__(self) -> int:
        """Number of candidates (``num_candidates``)."""
        ...

    def __getitem__(self, gid: int) -> dict[str, np.ndarray]:
        """``training_sample(gid)``: what a data loader reads."""
        ...

    @property
    def num_candidates(self) -> int:
        """Number of candidates; ids are 0 .. num_candidates - 1."""
        ...

    @property
    def domains(self) -> list[str]:
        """Domain names; ``domain_ids`` indexes into this list (-1: unknown)."""
        ...

    def domain_ids(self, ids: np.ndarray) -> np.ndarray:
        """int16 domain index of each candidate id."""
        ...

    def training_sample(self, gid: int) -> dict[str, np.ndarray]:
        """tokens, labels, loss_mask, position_ids of one sequence (seq_length each)."""
        ...

    def text(self, gid: int) -> str:
        """The candidate's text (decoded from tokens where the pool holds token ids)."""
        ...

    def tokens(self, gid: int) -> np.ndarray:
        """The candidate's token ids in the pretraining tokenizer."""
        ...

    def selection_store(self, run_name: str):
        """A ``SelectionStore`` beside the data for published selections, or None (checkpoint only)."""
        ...

    def fingerprint(self) -> str:
        """Identifies the pool's content; a resumed run refuses a pool whose fingerprint changed."""
        ...


def identity_digest(identity: str) -> str:
    """A fixed-length digest of what identifies a pool's data (its fingerprint, and what else the pool reads),
    carried by a pickled pool to check its rebuild against (a WebDataset fingerprint grows with its shards)."""
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def refuse_if_changed(what: str, then: str, now: str) -> None:
    """Raise when a rebuilt pool's ``identity_digest`` differs from the one it was pickled with."""
    if now != then:
        raise PoolError(
            f"{what} changed since it was pickled (fingerprint digest {then} then, {now} now): a pool must not "
            "change while a run reads it; restore the data it was built from (a run on other data is a new run)"
        )


def document_sample(ids: np.ndarray, seq_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """One training sequence from a document's token ids (pools with one document per candidate): its first
    seq_length + 1 tokens; padding (if shorter) is masked out of the loss."""
    ids = ids[: seq_length + 1]
    row = np.full(seq_length + 1, pad_id, dtype=np.int64)
    row[: len(ids)] = ids
    mask = np.zeros(seq_length, dtype=np.float32)
    mask[: max(len(ids) - 1, 0)] = 1.0
    return {
        "tokens": row[:-1],
        "labels": row[1:],
        "loss_mask": mask,
        "position_ids": np.arange(seq_length, dtype=np.int64),
    }


class PoolBase(Component):
    """What every pool does alike: a pool reads as a dataset of its training samples (``len`` and ``[gid]``),
    and names its domains in the order they are first met. Every registered pool derives from it (``POOLS``
    refuses others), so the run reads its capabilities from these declarations. Its options (``Config``) come
    from the selection's ``pool:`` section (``pool: {kind: webdataset, shards: DIR}``)."""

    host_dataset: ClassVar[bool] = False
    """The candidates are the host's own train dataset, which the host sizes to ``plugin.pool_num_samples``."""
    decodes_text: ClassVar[bool] = False
    """Text is decoded from token ids with the pretraining tokenizer (the host must pass it to read text)."""
    tokenizes_text: ClassVar[bool] = False
    """The pool tokenises documents' text itself with the pretraining tokenizer (the host must pass it)."""
    _domains: list[str]

    def __len__(self) -> int:
        return self.num_candidates

    def __getitem__(self, gid: int) -> dict[str, np.ndarray]:
        return self.training_sample(gid)

    @classmethod
    def check_config(cls, config) -> None:
        """Refuse what this pool cannot run with before anything is built (its ``Config`` validated itself);
        nothing by default."""
        return None

    def _domain_index(self, name: str | None) -> int:
        """The index of domain ``name`` in ``domains``, added when new; -1 for no domain."""
        if name is None:
            return -1
        if name not in self._domains:
            self._domains.append(name)
        return self._domains.index(name)


POOLS: Registry[type[PoolBase]] = Registry("pool", base=PoolBase)


class DocumentPool(PoolBase):
    """A pool of whole documents (WebDataset, Energon): a training sample is a document's first seq_length + 1
    tokens, padding (if shorter) masked out of the loss."""

    seq_length: int
    pad_id: int

    def training_sample(self, gid: int) -> dict[str, np.ndarray]:
        return document_sample(self.tokens(gid), self.seq_length, self.pad_id)


class CandidateTexts(Sequence[str]):
    """The texts of a round's candidates, decoded when read (an int gives a str, a slice a list).

    What scorers hand the influence model: each member of the influence group reads the probes and its own
    contiguous shard, so no rank holds the text of every candidate of a 25.6M-candidate round.
    """

    def __init__(self, pool: CandidatePool, ids: np.ndarray) -> None:
        self.pool = pool
        self.ids = np.asarray(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.pool.text(int(g)) for g in self.ids[i]]
        return self.pool.text(int(self.ids[i]))


class CandidateTokens(CandidateTexts):
    """The token ids of a round's candidates (int arrays, read on access): what the influence encoder reads
    instead of text when the pool is tokenised with its own vocabulary (``influence.pass_token_ids``)."""

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.pool.tokens(int(g)) for g in self.ids[i]]
        return self.pool.tokens(int(self.ids[i]))


def candidate_inputs(pool: CandidatePool, ids: np.ndarray, *, token_ids: bool) -> CandidateTexts:
    """What the influence model reads for candidates ``ids``: their token ids or their text."""
    return (CandidateTokens if token_ids else CandidateTexts)(pool, ids)


@dataclass(frozen=True)
class PoolRounds:
    """How a pool is split into rounds: round r selects among ``candidates_per_round`` ids of its own.

    The ids of round r are ``perm[r * candidates_per_round : (r + 1) * candidates_per_round]`` of a
    permutation seeded by ``seed`` (identity when ``shuffle`` is False), so every rank derives the same
    split and a round never straddles shards by arithmetic on shard sizes.
    """

    num_candidates: int
    """Size of the pool."""
    candidates_per_round: int
    """Candidates each round selects from."""
    seed: int = 0
    """Seed of the permutation."""
    shuffle: bool = True
    """Permute ids before splitting (False: contiguous id ranges)."""

    def __post_init__(self) -> None:
        if self.num_candidates < 1:
            raise PoolError("the pool is empty: it needs at least one candidate")
        if not 1 <= self.candidates_per_round <= self.num_candidates:
            raise PoolError(
                f"candidates_per_round={self.candidates_per_round} must be in [1, {self.num_candidates}] "
                "(the pool size); lower it or add data to the pool"
            )

    @property
    def num_rounds(self) -> int:
        return self.num_candidates // self.candidates_per_round

    @cached_property
    def _perm(self) -> np.ndarray:
        # Computed once: at 10M candidates the permutation takes ~0.2 s and 40 MB.
        if not self.shuffle:
            return np.arange(self.num_candidates, dtype=np.int32)
        return np.random.default_rng(self.seed).permutation(np.arange(self.num_candidates, dtype=np.int32))

    def candidates(self, round_: int) -> np.ndarray:
        """The int32 candidate ids of round ``round_``."""
        if not 0 <= round_ < self.num_rounds:
            raise PoolError(
                f"round {round_} is past the pool: {self.num_candidates} candidates make {self.num_rounds} "
                f"rounds of {self.candidates_per_round}; add data, lower candidates_per_round or train fewer steps"
            )
        c = self.candidates_per_round
        return self._perm[round_ * c : (round_ + 1) * c]

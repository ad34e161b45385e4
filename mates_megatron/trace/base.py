"""Tracing: which training documents are behind a query. One interface, registered by name in ``TRACERS``.

``Tracer.trace(TraceInput) -> TraceResult``: the ``top_k`` documents of the pool per query, higher score =
more supportive, identical on every rank. Tracers that need the model get a ``ProbeContext`` (the same
live-model view the probes use: TP/PP shards, process groups, the host's schedule) and leave the model
exactly as they found it. The pool is streamed in chunks of ids, each data-parallel replica taking its
strided share; every rank keeps only the best ``top_k`` per query (memory follows k, not the pool), and the
replicas' bests are merged at the end.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch.distributed as dist

from mates_megatron.component import Component
from mates_megatron.progress import progress as progress_bar
from mates_megatron.registry import Registry

if TYPE_CHECKING:
    from mates_megatron.pool.base import CandidatePool
    from mates_megatron.probe.context import ProbeContext
    from mates_megatron.probe.reference import ReferenceSet


@dataclass
class Queries:
    """The queries of one trace: their ids, their text (for lexical and embedding methods) and their rows
    (for the model: the target tokens counted, as in the reference set)."""

    ids: list[str]
    texts: list[str]
    rows: ReferenceSet | None = None
    examples: list[dict] = field(default_factory=list)
    """The JSONL objects as read ({"context", "target"} or {"text"}, with "id" when given)."""

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class TraceInput:
    queries: Queries
    pool: CandidatePool
    ids: np.ndarray
    """Candidate ids traced over (the whole pool by default)."""
    top_k: int
    model: ProbeContext | None = None
    seed: int = 0
    chunk: int = 256
    """Candidates read (and scored) at a time."""
    show_progress: bool = True


@dataclass
class TraceResult:
    ids: np.ndarray
    """[queries, top_k] int64 candidate ids, best first (-1 where fewer were scored)."""
    scores: np.ndarray
    """[queries, top_k] float64, higher = more supportive (NaN where ids is -1)."""
    method: str
    verdicts: list[np.ndarray] | None = None
    """Per query, the candidate ids a verifier judged supportive (FASTTRACK), sorted; None: no verifier."""
    record: dict = field(default_factory=dict)


class TopK:
    """The best ``k`` (score, id) per query seen so far; ties go to the smaller id, so the result does not
    depend on the order or the split in which candidates arrive."""

    def __init__(self, queries: int, k: int) -> None:
        self.k = k
        self.ids = np.full((queries, 0), -1, dtype=np.int64)
        self.scores = np.zeros((queries, 0), dtype=np.float64)

    def add(self, ids: np.ndarray, scores: np.ndarray) -> None:
        """``scores``: [queries, len(ids)]; NaN is refused (a NaN would silently sort anywhere)."""
        scores = np.asarray(scores, dtype=np.float64)
        if not np.isfinite(scores).all():
            bad = np.argwhere(~np.isfinite(scores))[0]
            raise FloatingPointError(
                f"trace score of candidate {int(ids[bad[1]])} for query {int(bad[0])} is {scores[tuple(bad)]}: "
                "the model's loss is not finite there; check the checkpoint (or lower the step size)"
            )
        self.add_rows(np.broadcast_to(np.asarray(ids, dtype=np.int64), scores.shape), scores)

    def merged(self, group=None) -> TopK:
        """The best k over every rank of ``group`` (every rank gets the same)."""
        if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
            return self
        parts: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, (self.ids, self.scores), group=group)
        out = TopK(self.ids.shape[0], self.k)
        for ids, scores in parts:
            if ids.shape[1]:
                out.add_rows(ids, scores)
        return out

    def add_rows(self, ids: np.ndarray, scores: np.ndarray) -> None:
        """Add per-query candidate rows (``ids`` [queries, m], as another TopK holds them)."""
        all_ids = np.concatenate([self.ids, ids], axis=1)
        all_scores = np.concatenate([self.scores, scores], axis=1)
        # Sort by (-score, id): lexsort takes the last key as primary.
        order = np.lexsort((all_ids, -all_scores), axis=1)[:, : self.k]
        self.ids = np.take_along_axis(all_ids, order, axis=1)
        self.scores = np.take_along_axis(all_scores, order, axis=1)

    @classmethod
    def stack(cls, parts: list[TopK]) -> TopK:
        """One TopK whose queries are those of ``parts`` in order (rows padded with id -1)."""
        out = cls(sum(p.ids.shape[0] for p in parts), parts[0].k)
        width = max(p.ids.shape[1] for p in parts)
        out.ids = np.concatenate(
            [np.pad(p.ids, ((0, 0), (0, width - p.ids.shape[1])), constant_values=-1) for p in parts]
        )
        out.scores = np.concatenate(
            [np.pad(p.scores, ((0, 0), (0, width - p.ids.shape[1])), constant_values=-np.inf) for p in parts]
        )
        return out

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of [queries, k]; id -1 and score NaN where fewer than k candidates were scored."""
        q, m = self.ids.shape
        ids = np.full((q, self.k), -1, dtype=np.int64)
        scores = np.full((q, self.k), np.nan)
        ids[:, :m], scores[:, :m] = self.ids, self.scores
        scores[ids < 0] = np.nan
        return ids, scores


def chunks(inp: TraceInput, ids: np.ndarray, desc: str) -> Iterator[np.ndarray]:
    """``ids`` in chunks of ``inp.chunk``, with a progress bar on rank 0."""
    show = inp.show_progress and (not dist.is_initialized() or dist.get_rank() == 0)
    with progress_bar(total=len(ids), desc=desc, unit="doc", leave=False, disable=not show) as bar:
        for s in range(0, len(ids), inp.chunk):
            part = ids[s : s + inp.chunk]
            yield part
            bar.update(len(part))


def replica_share(inp: TraceInput) -> np.ndarray:
    """This data-parallel replica's strided share of the candidates (all of them without a model)."""
    if inp.model is None:
        return inp.ids
    g = inp.model.groups
    return inp.ids[g.data_parallel_rank :: g.data_parallel_size]


class Tracer(Component, ABC):
    """One tracing method, built from its options dataclass (``Config``, from ``trace --options``)."""

    method: ClassVar[str]
    needs_model: ClassVar[bool] = True

    @abstractmethod
    def trace(self, inp: TraceInput) -> TraceResult: ...


TRACERS: Registry[type[Tracer]] = Registry(
    "trace method", base=Tracer, how_to_register="register your own with @TRACERS.register(name)"
)

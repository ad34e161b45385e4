"""MatesSampler: Megatron-LM's pretraining batch-sampler contract, serving each round's selection.

The training run is one global sequence of sample positions 0, 1, 2, ... (``consumed_samples`` counts
them). Round r owns positions ``[r * samples_per_round, (r + 1) * samples_per_round)`` and serves exactly the
``samples_per_round`` candidate ids published for it, in an order shuffled by (seed, r): within a round no id
is served twice and none is skipped. Position p always maps to the same id, whatever the data-parallel
size; a rank's micro-batches are Megatron's contiguous slices of each ``micro_batch_size x dp`` chunk, so
ranks are disjoint and together cover every global batch. Selections are int32 arrays (4 bytes an id).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from mates_megatron.pool.base import PoolError


class MatesSampler:
    """Drop-in for Megatron-LM's ``MegatronPretrainingSampler`` (``DataLoader(batch_sampler=...)``).

    Args (Megatron's): total_samples, consumed_samples, micro_batch_size, data_parallel_rank,
    data_parallel_size, drop_last. Args (plugin): samples_per_round (positions per round: select_every x
    global_batch_size), seed (serving order), global_batch_size (for ``micro_batch_indices``).
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
        *,
        samples_per_round: int,
        seed: int = 0,
        global_batch_size: int | None = None,
    ) -> None:
        if total_samples <= 0:
            raise ValueError(f"no sample to consume: total_samples={total_samples}")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(f"no samples left to consume: consumed {consumed_samples} of {total_samples}")
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise ValueError("micro_batch_size and data_parallel_size must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        if not drop_last:
            raise ValueError(
                "MatesSampler needs drop_last=True: a partial last batch would serve part of a round twice "
                "on some ranks; size total_samples to whole global batches"
            )
        if samples_per_round <= 0:
            raise ValueError(f"samples_per_round must be positive, got {samples_per_round}")
        if global_batch_size is not None and samples_per_round % global_batch_size:
            raise ValueError(
                f"samples_per_round={samples_per_round} is not a multiple of global_batch_size="
                f"{global_batch_size}: a round must end at a step boundary"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last
        self.samples_per_round = samples_per_round
        self.seed = seed
        self.global_batch_size = global_batch_size
        self._rounds: dict[int, np.ndarray] = {}

    # -- publishing ---------------------------------------------------------------------------------------
    def publish(self, round_: int, selected: np.ndarray) -> None:
        """Make ``selected`` (candidate ids, any order) round ``round_``'s data; shuffled by (seed, round).

        Every rank that serves the run publishes the same ids (the round computes them identically there).
        """
        selected = np.ascontiguousarray(selected, dtype=np.int32)
        if selected.size != self.samples_per_round:
            raise PoolError(
                f"round {round_}: the selection has {selected.size} ids, the round serves exactly "
                f"{self.samples_per_round} (select_every x global_batch_size); select that many"
            )
        # sort + neighbour compare: np.unique is ~10x slower at millions of ids.
        ordered = np.sort(selected)
        if (ordered[1:] == ordered[:-1]).any():
            raise PoolError(f"round {round_}: the selection holds duplicate ids; a round serves each id once")
        order = np.random.default_rng([self.seed, round_]).permutation(selected.size)
        self._rounds[round_] = selected[order]

    def published_rounds(self) -> list[int]:
        return sorted(self._rounds)

    def round_of(self, position: int) -> int:
        return position // self.samples_per_round

    # -- serving ------------------------------------------------------------------------------------------
    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        """Candidate ids served at global sample positions (vectorised)."""
        positions = np.asarray(positions, dtype=np.int64)
        rounds = positions // self.samples_per_round
        out = np.empty(positions.shape, dtype=np.int32)
        for r in np.unique(rounds):
            sel = self._rounds.get(int(r))
            if sel is None:
                raise PoolError(
                    f"round {int(r)} has no published selection (positions {positions.min()}..{positions.max()}); "
                    "publish it before training reaches the round boundary"
                )
            m = rounds == r
            out[m] = sel[positions[m] - r * self.samples_per_round]
        return out

    def micro_batch_indices(self, consumed_samples: int) -> list[np.ndarray]:
        """This rank's micro-batches of the global batch starting at ``consumed_samples`` (Trainer API).

        Rounds before the current one are released: they will not be served again.
        """
        if self.global_batch_size is None:
            raise ValueError("MatesSampler(global_batch_size=...) is needed for micro_batch_indices")
        self.consumed_samples = consumed_samples
        current = self.round_of(consumed_samples)
        for r in [r for r in self._rounds if r < current]:
            del self._rounds[r]
        return list(self._micro_batches(consumed_samples, consumed_samples + self.global_batch_size))

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self) -> Iterator[list[int]]:
        """Megatron's iteration: per chunk of micro_batch_size x dp positions, this rank's slice (as a list)."""
        return self.batches(self.consumed_samples)

    def batches(self, start: int, end: int | None = None) -> Iterator[list[int]]:
        """This rank's micro-batches (id lists) of the whole chunks between positions ``start`` and ``end``.

        ``end`` defaults to ``total_samples``; ``start`` is a chunk boundary (a consumed-samples count). A
        round with no published selection raises PoolError when it is reached, not before.
        """
        end = self.total_samples if end is None else min(end, self.total_samples)
        for ids in self._micro_batches(start, end):
            yield ids.tolist()

    def _micro_batches(self, start: int, end: int) -> Iterator[np.ndarray]:
        chunk = self.micro_batch_size * self.data_parallel_size
        offset = self.data_parallel_rank * self.micro_batch_size
        for c in range(start, end - chunk + 1, chunk):
            yield self.ids_at(np.arange(c + offset, c + offset + self.micro_batch_size))

    def published_end(self, start: int) -> int:
        """Where the published rounds that run on from ``start`` stop (a position; at most total_samples).

        A torch DataLoader draws indices ahead of training (prefetch, workers): ``batches(start,
        published_end(start))`` stops before a round that has not been chosen yet.
        """
        r = self.round_of(start)
        while r in self._rounds:
            r += 1
        return min(self.total_samples, r * self.samples_per_round)

    # -- resume -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Selections still to be served (current and later rounds) and what defines the order."""
        current = self.round_of(self.consumed_samples)
        return {
            "samples_per_round": self.samples_per_round,
            "seed": self.seed,
            "consumed_samples": self.consumed_samples,
            "rounds": {r: sel.copy() for r, sel in self._rounds.items() if r >= current},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("samples_per_round", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"checkpointed sampler has {key}={state[key]}, this run {getattr(self, key)}: the sample "
                    "sequence would change; resume with the same select_every, global batch size and seed"
                )
        self.consumed_samples = int(state["consumed_samples"])
        self._rounds = {int(r): np.asarray(sel, dtype=np.int32) for r, sel in state["rounds"].items()}

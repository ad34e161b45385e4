"""Training-loop hooks that run selection rounds and publish them to MatesSampler."""

from __future__ import annotations

from typing import Any

import numpy as np

from mates_megatron.pool.base import CandidatePool, PoolRounds
from mates_megatron.pool.manifest import SelectionStore
from mates_megatron.sampler import MatesSampler
from mates_megatron.select import Selector


class SelectionHook:
    """Publishes round r's selection at the end of round r-1 (round 0 at construction).

    For score-free selectors (random) the selection is computed identically on every rank from
    (seed, round), so no communication is needed. Per-round domain shares are kept for reporting.
    """

    def __init__(
        self,
        *,
        pool: CandidatePool,
        rounds: PoolRounds,
        sampler: MatesSampler,
        selector: Selector,
        select_every: int,
        seed: int,
        store: SelectionStore | None = None,
        write_files: bool = False,
    ) -> None:
        self.pool, self.rounds, self.sampler, self.selector = pool, rounds, sampler, selector
        self.select_every, self.seed = select_every, seed
        self.store, self.write_files = store, write_files
        self.domain_share: dict[int, dict[str, float]] = {}
        self.publish(0)

    def publish(self, round_: int) -> np.ndarray:
        candidates = self.rounds.candidates(round_)
        chosen = self.selector.select(
            candidates, self.sampler.samples_per_round, scores=None, seed=self.seed, round_=round_
        )
        self.sampler.publish(round_, chosen)
        self.domain_share[round_] = self._shares(chosen)
        if self.store is not None and self.write_files:
            self.store.save(round_, chosen)
        return chosen

    def _shares(self, ids: np.ndarray) -> dict[str, float]:
        dom = self.pool.domain_ids(ids)
        names = self.pool.domains
        counts = np.bincount(dom[dom >= 0], minlength=len(names))
        return {name: float(c) / len(ids) for name, c in zip(names, counts, strict=True)}

    def on_step_end(self, trainer, iteration: int, metrics: dict[str, float]) -> None:
        total = getattr(trainer.cfg, "train_iters", None)
        if iteration % self.select_every == 0 and (total is None or iteration < total):
            self.publish(iteration // self.select_every)

    def state_dict(self) -> dict[str, Any]:
        return {"domain_share": self.domain_share, "pool": self.pool.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["pool"] != self.pool.fingerprint():
            raise ValueError(
                "the candidate pool changed since the checkpoint was written (fingerprint differs): the "
                "resumed run would train on other data; resume with the original pool"
            )
        self.domain_share = state["domain_share"]

"""The mixture selector: each round serves the configured domain weights, from per-domain streams.

Every domain of the pool is one stream: its candidate ids in an order seeded by (seed, domain), read once
from the start. Round r gives domain d the quota ``round(k * w_d(r))`` (largest remainders, so the quotas sum
to k and each share is within 1/k of its weight) and takes the next ``quota`` ids of d's stream. The state
is the number of candidates consumed per domain, so a weight change at a round boundary moves no domain's
position: nothing is repeated or skipped (Megatron-LM's blended dataset recomputes its sample index from the
weights, which is how users lose or repeat data when blend weights change mid-run: Megatron-LM #457, PR #725).

A domain that runs short (fewer ids left than its quota) gives what it has, and with ``when_short:
redistribute`` the rest of its quota goes to the domains with data left, in proportion to their weights;
the round is logged as a warning and recorded (``short``). ``when_short: error`` stops the run instead. The
selector never draws an id twice, in a round or across rounds; a run whose pool has no data left at all
stops with the round and the domains named. The round's slice of the pool (``PoolRounds``) is not used:
``selection_ratio`` only sizes the pool, so it is the headroom each domain has over its share.

Weights come from a file (``MixtureConfig.weights``: ``selector: {kind: mixture, weights: PATH}``, see
``mixture.weights``), read at each round
boundary on global rank 0 and broadcast, so every rank draws with the same weights even while the file is
being replaced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch.distributed as dist

from mates_megatron.mixture.weights import MixtureError, read_weights
from mates_megatron.pool.base import PoolError
from mates_megatron.selectors.base import SELECTORS, Selector

log = logging.getLogger("mates_megatron.mixture")

WHEN_SHORT = ("redistribute", "error")


def quotas(k: int, weights: np.ndarray) -> np.ndarray:
    """Integer quotas summing to k, each within 1 of ``k * w`` (largest remainders; ties to the lower index)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = k * w / w.sum()
    q = np.floor(exact).astype(np.int64)
    rest = k - int(q.sum())
    if rest:
        order = np.lexsort((np.arange(len(w)), -(exact - q)))
        q[order[:rest]] += 1
    return q


@dataclass(frozen=True)
class MixtureConfig:
    """Options of the 'mixture' selector (``selector: {kind: mixture, weights: PATH}``)."""

    weights: str | None = None
    """Domain-weight file it serves (written by `mates-megatron mixture fit|predict`, or by hand; see
    mates_megatron.mixture.weights): each round's selection follows its weights, drawn from per-domain
    streams. Re-read at every round boundary: append a schedule entry to change the weights of rounds not
    yet drawn."""
    when_short: str = "redistribute"
    """When a domain has fewer candidates left than its quota: 'redistribute' (it gives what it has and the
    rest goes to the domains with data left, by weight; logged) or 'error' (stop)."""

    def __post_init__(self) -> None:
        if not self.weights:
            raise ValueError(
                "selector 'mixture' serves domain weights from a file: set MixtureConfig.weights "
                "(--mates-mixture-weights) to one written by `mates-megatron mixture fit|predict`"
            )
        if self.when_short not in WHEN_SHORT:
            raise ValueError(
                f"MixtureConfig.when_short={self.when_short!r}: use one of {', '.join(WHEN_SHORT)}"
            )


@SELECTORS.register("mixture")
class MixtureSelector(Selector):
    """Serves domain weights from per-domain streams (see the module); stateful: rounds are drawn in order."""

    needs_scores: ClassVar[bool] = False
    draws_every_round: ClassVar[bool] = True
    built_on_pool: ClassVar[bool] = True
    stateful: ClassVar[bool] = True
    Config: ClassVar[type] = MixtureConfig

    def __init__(
        self, domains: list[str], domain_of: np.ndarray, weights_path: str, *, seed: int,
        when_short: str = "redistribute",
    ) -> None:  # fmt: skip
        if when_short not in WHEN_SHORT:
            raise ValueError(f"mixture when_short={when_short!r}: use one of {', '.join(WHEN_SHORT)}")
        domain_of = np.asarray(domain_of)
        unknown = int((domain_of < 0).sum())
        if unknown:
            raise PoolError(
                f"the mixture selector needs every candidate's domain, and {unknown} of {len(domain_of)} have "
                "none: an indexed pool needs PREFIX.domains.npy (`mates-megatron prepare` writes it), an "
                "energon pool energon_domain_field, WebDataset samples a 'domain' entry"
            )
        self.domains, self.weights_path = list(domains), weights_path
        self.seed, self.when_short = seed, when_short
        self._domain_of = domain_of.astype(np.int16)
        self.sizes = np.bincount(self._domain_of, minlength=len(self.domains)).astype(np.int64)
        """Candidates per domain (each domain's stream length)."""
        self._streams: list[np.ndarray] | None = None
        self.consumed = np.zeros(len(self.domains), dtype=np.int64)
        self.next_round = 0
        self.history: dict[int, dict[str, Any]] = {}
        """Per drawn round: the weights used, the counts served, and the domains that ran short."""
        self.check_schedule(read_weights(weights_path))

    @classmethod
    def build(cls, config: MixtureConfig, *, seed: int, pool=None) -> MixtureSelector:
        ids = np.arange(len(pool), dtype=np.int64)
        return cls(
            pool.domains, pool.domain_ids(ids), config.weights, seed=seed, when_short=config.when_short
        )

    def check_schedule(self, schedule) -> None:
        missing = sorted(set(self.domains) - set(schedule.domains))
        extra = sorted(set(schedule.domains) - set(self.domains))
        if missing or extra:
            raise MixtureError(
                f"mixture weights {self.weights_path} name domains {sorted(schedule.domains)}, the pool has "
                f"{self.domains}: {'missing ' + str(missing) if missing else ''}"
                f"{' unknown ' + str(extra) if extra else ''}; name every pool domain (weight 0 leaves one out)"
            )

    # -- streams ------------------------------------------------------------------------------------------
    def _stream(self, d: int) -> np.ndarray:
        if self._streams is None:
            # One stable argsort groups the ids by domain (ascending id within each); each group is then
            # permuted by (seed, domain) alone, so a domain's order does not depend on the others' sizes.
            order = np.argsort(self._domain_of, kind="stable").astype(np.int32)
            ends = np.cumsum(self.sizes)
            self._streams = [
                order[e - n : e][np.random.default_rng([self.seed, i, 0x313C]).permutation(n)]
                for i, (n, e) in enumerate(zip(self.sizes, ends, strict=True))
            ]
        return self._streams[d]

    def _weights(self, round_: int) -> np.ndarray:
        schedule = None
        if not dist.is_initialized() or dist.get_rank() == 0:
            schedule = read_weights(self.weights_path)
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [schedule]
            dist.broadcast_object_list(box, src=0)
            schedule = box[0]
        self.check_schedule(schedule)
        w = schedule.at(round_)
        return np.array([w[d] for d in self.domains], dtype=np.float64)

    # -- the round ----------------------------------------------------------------------------------------
    def select(self, candidates, k, *, scores=None, seed, round_):
        if round_ != self.next_round:
            raise RuntimeError(
                f"mixture selector: round {round_} drawn after round {self.next_round - 1}; rounds are drawn "
                "in order (the per-domain positions are the state)"
            )
        if seed != self.seed:
            raise ValueError(f"mixture selector built with seed {self.seed}, called with {seed}")
        w = self._weights(round_)
        q = self.plan(k, w, round_)
        picks = [self._stream(d)[self.consumed[d] : self.consumed[d] + q[d]] for d in range(len(q))]
        self.consumed += q
        self.next_round = round_ + 1
        return np.sort(np.concatenate(picks).astype(np.int32))

    def plan(self, k: int, w: np.ndarray, round_: int) -> np.ndarray:
        """Each domain's count for this round (records the round; redistributes or raises when short)."""
        left = self.sizes - self.consumed
        want = quotas(k, w)
        q = np.minimum(want, left)
        # Hand what short domains cannot give to those with data left, by weight, until the round is full.
        while q.sum() < k:
            room = left - q
            if not (room > 0).any() or self.when_short == "error":
                break
            by = np.where(room > 0, w, 0.0)
            if by.sum() == 0:  # every weighted domain is exhausted: the rest by what is left
                by = room.astype(np.float64)
            q += np.minimum(quotas(int(k - q.sum()), by), room)
        short = {self.domains[d]: int(want[d] - q[d]) for d in range(len(q)) if q[d] < want[d]}
        if q.sum() < k or (short and self.when_short == "error"):
            raise PoolError(
                f"mixture round {round_}: domain(s) {short} have run out of candidates "
                f"(left: {dict(zip(self.domains, left.tolist(), strict=True))}; the round needs {k}); lower "
                "their weights, add data, or raise the pool size (a lower selection_ratio)"
                + ("" if self.when_short == "error" else "; no domain has data left")
            )
        if short and (not dist.is_initialized() or dist.get_rank() == 0):
            log.warning(
                "mixture round %d: %s ran short of their quota; given instead to %s",
                round_,
                ", ".join(f"{d} by {n}" for d, n in short.items()),
                ", ".join(
                    f"{self.domains[d]} +{int(q[d] - want[d])}" for d in range(len(q)) if q[d] > want[d]
                ),
            )
        self.history[round_] = {
            "weights": dict(zip(self.domains, w.tolist(), strict=True)),
            "served": dict(zip(self.domains, q.tolist(), strict=True)),
            "short": short,
        }
        return q

    def summary(self) -> dict[str, Any]:
        return {
            "consumed": dict(zip(self.domains, self.consumed.tolist(), strict=True)),
            "sizes": dict(zip(self.domains, self.sizes.tolist(), strict=True)),
            "short_rounds": {r: h["short"] for r, h in self.history.items() if h["short"]},
        }

    # -- checkpoint ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "domains": self.domains,
            "seed": self.seed,
            "consumed": self.consumed.copy(),
            "next_round": self.next_round,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["domains"]) != self.domains or state["seed"] != self.seed:
            raise ValueError(
                f"checkpointed mixture selector has domains {state['domains']} and seed {state['seed']}, this "
                f"run {self.domains} and {self.seed}: the streams would differ; resume with the same pool and seed"
            )
        self.consumed = np.asarray(state["consumed"], dtype=np.int64).copy()
        self.next_round = int(state["next_round"])
        self.history = dict(state["history"])

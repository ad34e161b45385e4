"""MatesHook: the selection round inside the running job, called by the host at each step end.

Round r trains on a selection from round r's slice of the pool. Warm-up rounds (and every round of a
score-free selector such as 'random') are drawn uniformly from (seed, round) on every rank without
communication; a selector that draws every round itself ('mixture': domain weights from per-domain streams)
draws them instead, round 0 included. A scored round r is prepared at the end of the last step of round r-1, on the model as it is
then:

    score   : the configured scorer gives every candidate of round r a score (for 'mates': probe a seeded
              sample on the live model, fit the influence model, predict every candidate)
    select  : the selector (Gumbel-top-k for MATES) picks samples_per_round of them, seeded by (seed, r)
    publish : MatesSampler serves them from the first step of round r

With ``probe_lead_steps`` L > 0, round r is probed at the end of step r * select_every - L and published at
the end of step r * select_every; with ``asynchronous`` the influence stage (fit, predict) runs in side
processes during those L steps, and the publishing step waits for it (the round's ``stall``). The selection
depends only on the model at the probe step and the seeds, never on timing. A checkpoint taken between the
probe and the publishing step first waits for the round (``settle``) and saves its selection.

Every rank ends with the same selection (the scorer's contract). The scorer's randomness runs inside an
isolated RNG scope seeded by (seed, round), so training's RNG streams never see it and a resumed run
repeats it exactly. The hook reads the job only through the ``Host`` protocol (``mates_megatron.host``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mates_megatron.host import Host
from mates_megatron.influence.group import influence_group
from mates_megatron.pool.base import CandidatePool, PoolRounds
from mates_megatron.pool.manifest import SelectionStore
from mates_megatron.runtime.rng import get_rng_state, set_rng_state
from mates_megatron.sampler import MatesSampler
from mates_megatron.scorers.base import PendingScores, RoundInput, Scorer
from mates_megatron.selectors import RandomSelector, Selector, TopKSelector

log = logging.getLogger("mates_megatron.hooks")


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run a block on its own seeded RNG streams and give training its streams back afterwards."""
    saved = get_rng_state()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        set_rng_state(saved)


class MatesHook:
    """Publishes round r's selection at the end of round r-1 (round 0 at construction)."""

    def __init__(
        self,
        *,
        pool: CandidatePool,
        rounds: PoolRounds,
        sampler: MatesSampler,
        selector: Selector,
        select_every: int,
        seed: int,
        train_iters: int,
        scorer: Scorer | None = None,
        warmup_rounds: int = 0,
        store: SelectionStore | None = None,
        state_rank: int = 0,
        probe_lead_steps: int = 0,
        filters: Sequence[tuple[Scorer, float]] = (),
    ) -> None:
        self.pool, self.rounds, self.sampler, self.selector = pool, rounds, sampler, selector
        self.select_every, self.seed, self.train_iters = select_every, seed, train_iters
        if selector.needs_scores and scorer is None:
            raise ValueError(f"selector {type(selector).__name__} needs a scorer")
        self.scorer = scorer if selector.needs_scores else None
        self.warmup_rounds = warmup_rounds if self.scorer is not None else 0
        self.store = store
        """Where published selections are also written (rank 0 only; None: checkpoint only)."""
        self.state_rank = state_rank
        """The rank whose ``state_dict`` is complete (holds the influence model): a host saving the state
        from one rank saves this one's."""
        self.probe_lead_steps = probe_lead_steps
        self.filters = list(filters) if self.scorer is not None else []
        """Stacked selection: (scorer, kept fraction) applied in order to a scored round's candidates."""
        self._pending: dict[int, tuple[PendingScores, float, np.ndarray]] = {}
        """Rounds probed and not yet finished: their pending scores, the seconds their probe took and the
        candidates scored (the round's, or what the filters kept)."""
        self._chosen: dict[int, np.ndarray] = {}
        """Rounds finished ahead of their first step (a checkpoint between probe and publish): saved."""
        self.domain_share: dict[int, dict[str, float]] = {}
        self.records: dict[int, dict[str, Any]] = {}
        self._filter_records: dict[int, list[dict[str, Any]]] = {}
        """Per probed round not yet finished: what each filter kept (moved into the round's record)."""
        """Per scored round: what the scorer reported, the time per phase and the selected domain shares."""
        # Unscored rounds (round 0, warm-up, a score-free run) are a uniform draw, unless the selector draws
        # every round itself (the mixture selector serves its weights from round 0).
        self._unscored = selector if selector.draws_every_round else RandomSelector()
        self.publish(
            0, self._unscored.select(rounds.candidates(0), sampler.samples_per_round, seed=seed, round_=0)
        )

    # -- the round ----------------------------------------------------------------------------------------
    def publish(self, round_: int, chosen: np.ndarray) -> None:
        self.sampler.publish(round_, chosen)
        self.domain_share[round_] = self._shares(chosen)
        if self.store is not None:
            self.store.save(round_, chosen)

    def _shares(self, ids: np.ndarray) -> dict[str, float]:
        dom = self.pool.domain_ids(ids)
        counts = np.bincount(dom[dom >= 0], minlength=len(self.pool.domains))
        return {name: float(c) / len(ids) for name, c in zip(self.pool.domains, counts, strict=True)}

    def _scored(self, round_: int) -> bool:
        return self.scorer is not None and round_ >= self.warmup_rounds

    def begin_round(self, host: Host, round_: int) -> None:
        """Probe ``round_`` on the live model now; its influence stage may go on beside training."""
        t = time.perf_counter()
        with isolated_rng(self.seed * 1_000_003 + round_):
            cands = self._filtered(host, round_)
            pending = self.scorer.begin(RoundInput(round_, cands, self.pool, host, self.seed))
        self._pending[round_] = (pending, time.perf_counter() - t, cands)

    def _filtered(self, host: Host, round_: int) -> np.ndarray:
        """The round's candidates after the filters: each keeps its best-scored fraction (ceil, ties by id)."""
        cands = self.rounds.candidates(round_)
        for i, (scorer, keep) in enumerate(self.filters):
            scores = scorer.score(RoundInput(round_, cands, self.pool, host, self.seed)).scores
            kept = TopKSelector().select(cands, math.ceil(keep * len(cands)), scores=np.asarray(scores))
            self._filter_records.setdefault(round_, []).append(
                {"filter": i, "candidates": int(len(cands)), "kept": int(len(kept)),
                 "kept_share": self._shares(kept)}
            )  # fmt: skip
            cands = kept
        return cands

    def finish_round(self, round_: int) -> np.ndarray:
        """Wait for ``round_``'s scores and select; returns the selection (collective over the world)."""
        pending, begin_seconds, cands = self._pending.pop(round_)
        t = time.perf_counter()
        result = pending.result()
        stall = time.perf_counter() - t
        # A lazy scorer's scores are computed where the selector reads them (and checked there).
        scores = result.scores if callable(result.scores) else np.asarray(result.scores, dtype=np.float64)
        if not callable(scores) and scores.shape != cands.shape:
            raise ValueError(
                f"scorer {type(self.scorer).__name__} returned {scores.shape[0]} scores for {len(cands)} "
                "candidates: it must return one per candidate, in their order"
            )
        t = time.perf_counter()
        # A scorer that flags its scores as unusable (a poor influence fit) gets the warm-up rounds' draw.
        selector = RandomSelector() if result.fallback else self.selector
        extra = {"features": result.features} if selector.needs_features else {}
        if selector.collective and dist.is_initialized():
            extra["group"] = influence_group()
        chosen, done = selector.select_with_record(cands, self.sampler.samples_per_round, scores=scores,
                                                   seed=self.seed, round_=round_, **extra)  # fmt: skip
        seconds = {"score": begin_seconds + stall, "stall": stall, "select": time.perf_counter() - t}
        seconds["total"] = seconds["score"] + seconds["select"]
        record = {"round": round_, "candidates": int(len(cands)), **result.record}
        if round_ in self._filter_records:
            record["filters"] = self._filter_records.pop(round_)
        if done:
            record["selector"] = done
        record["fallback"] = result.fallback
        if result.fallback and dist.is_initialized() and dist.get_rank() == 0:
            log.warning("round %d: selected at random instead of by scores: %s", round_, result.fallback)
        record["seconds"] = {**record.get("seconds", {}), **seconds}
        self.records[round_] = record
        return chosen

    def run_round(self, host: Host, round_: int) -> np.ndarray:
        """Score -> select for ``round_`` on the live model now; returns the selection."""
        if not self._scored(round_):
            cands = self.rounds.candidates(round_)
            return self._unscored.select(cands, self.sampler.samples_per_round, seed=self.seed, round_=round_)
        if round_ not in self._pending:
            self.begin_round(host, round_)
        return self.finish_round(round_)

    def settle(self) -> None:
        """Finish every probed round now (before a checkpoint: its selection is then saved). Collective:
        every rank calls it at the same step."""
        for round_ in sorted(self._pending):
            self._chosen[round_] = self.finish_round(round_)

    def close(self) -> None:
        """Stop the scorer's side processes (asynchronous rounds); they also stop when this process exits."""
        for scorer in [self.scorer, *(s for s, _ in self.filters)]:
            if scorer is not None:
                scorer.close()

    def on_step_end(self, host: Host, iteration: int, metrics: dict[str, float]) -> None:
        if iteration >= self.train_iters:
            return
        if iteration % self.select_every == 0:
            round_ = iteration // self.select_every
            chosen = self._chosen.pop(round_, None)
            self.publish(round_, chosen if chosen is not None else self.run_round(host, round_))
            if round_ in self.records:
                self._log_round(host, iteration, round_)
        ahead = iteration + self.probe_lead_steps
        if self.probe_lead_steps and ahead % self.select_every == 0 and ahead < self.train_iters:
            round_ = ahead // self.select_every
            if self._scored(round_) and round_ not in self._pending and round_ not in self._chosen:
                self.begin_round(host, round_)

    def _log_round(self, host: Host, iteration: int, round_: int) -> None:
        rec = self.records[round_]
        rec["selected_share"] = self.domain_share[round_]
        host.log_metrics(iteration, self.round_metrics(round_))
        if dist.is_initialized() and dist.get_rank() == 0:
            log.info(
                "round %d | %s | %.1f s (%s) | share %s",
                round_,
                ", ".join(f"{k} {v:.5g}" for k, v in rec.items() if _scalar(v) and k != "round"),
                rec["seconds"]["total"],
                ", ".join(f"{k} {v:.1f}" for k, v in rec["seconds"].items() if k != "total"),
                ", ".join(f"{k} {v:.2f}" for k, v in rec["selected_share"].items()),
            )

    def round_metrics(self, round_: int) -> dict[str, float]:
        """Flat scalars of a scored round for TensorBoard / W&B: ``mates/<record key>``."""
        rec = self.records[round_]
        out = {f"mates/{k}": float(v) for k, v in rec.items() if _scalar(v) and k != "candidates"}
        out["mates/fallback"] = float(bool(rec.get("fallback")))
        out.update({f"mates/seconds/{k}": v for k, v in rec["seconds"].items()})
        out.update(
            {f"mates/selector/{k}": float(v) for k, v in rec.get("selector", {}).items() if _scalar(v)}
        )
        out.update({f"mates/selected_share/{k}": v for k, v in self.domain_share[round_].items()})
        return out

    def selection_seconds(self) -> float:
        """Seconds the training process spent on selection (probes, waiting for scores, selecting)."""
        return float(sum(r["seconds"].get("total", 0.0) for r in self.records.values()))

    def stall_seconds(self) -> float:
        """Seconds training waited for scores at the rounds' first steps (asynchronous: the lateness)."""
        return float(sum(r["seconds"].get("stall", 0.0) for r in self.records.values()))

    def summary(self) -> dict[str, Any]:
        """JSON-ready: every round's domain shares and every scored round's record."""
        return {
            "select_every": self.select_every,
            "warmup_rounds": self.warmup_rounds,
            "domains": list(self.pool.domains),
            "selected_share_by_domain": [self.domain_share[r] for r in sorted(self.domain_share)],
            "rounds": [self.records[r] for r in sorted(self.records)],
            "selection_seconds": self.selection_seconds(),
            "stall_seconds": self.stall_seconds(),
            **({"selector": summary} if (summary := self.selector.summary()) else {}),
        }

    # -- checkpoint ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._pending:
            raise RuntimeError(
                f"MatesHook.state_dict with round(s) {sorted(self._pending)} probed and not finished: the host "
                "calls settle() on every rank before saving"
            )
        return {
            "pool": self.pool.fingerprint(),
            "chosen": self._chosen,
            "domain_share": self.domain_share,
            "records": self.records,
            "scorer": self.scorer.state_dict() if self.scorer is not None else None,
            "selector": self.selector.state_dict() if self.selector.stateful else None,
            **({"filters": [s.state_dict() for s, _ in self.filters]} if self.filters else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["pool"] != self.pool.fingerprint():
            raise ValueError(
                "the candidate pool changed since the checkpoint was written (fingerprint differs): the "
                "resumed run would train on other data; resume with the original pool"
            )
        self.domain_share = state["domain_share"]
        self.records = state.get("records", {})
        self._chosen = state.get("chosen", {})
        self._pending = {}
        if self.scorer is not None and state.get("scorer") is not None:
            self.scorer.load_state_dict(state["scorer"])
        saved = state.get("filters") or [None] * len(self.filters)
        if len(saved) != len(self.filters):
            raise ValueError(
                f"the checkpoint holds {len(saved)} filter states, this run has {len(self.filters)} filters: resume "
                "with the filters it was written with"
            )
        for (scorer, _), s in zip(self.filters, saved, strict=True):
            if s is not None:
                scorer.load_state_dict(s)
        if self.selector.stateful:
            if state.get("selector") is None:
                raise ValueError(
                    f"the checkpoint holds no state for selector {type(self.selector).__name__} (written by a run "
                    "with another selector): resume with the selector it was written with"
                )
            self.selector.load_state_dict(state["selector"])


def _scalar(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)

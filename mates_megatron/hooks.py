"""MatesHook: the selection round inside the running job, called by the training loop at each step end.

Round r trains on a selection from round r's slice of the pool. Warm-up rounds (and every round of the
'random' selector) are drawn uniformly from (seed, round) on every rank without communication. A scored round
r is prepared at the end of the last step of round r-1, on the model as it is then:

    probe   : draw ``probe_samples`` of round r's candidates (seeded), score them on the live model
    fit     : fit the data influence model on (probe text, oracle score) pairs
    score   : predict every candidate of round r
    select  : the selector (Gumbel-top-k for MATES) picks samples_per_round of them, seeded by (seed, r)
    publish : MatesSampler serves them from the first step of round r

Every rank ends with the same selection: probe scores are gathered to every rank and the predictions are
broadcast from the influence group. The round's own randomness (influence-model init and dropout) is seeded
by (seed, round) inside an isolated RNG scope, so training's RNG streams never see it and a resumed run
repeats it exactly.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from mates_megatron.influence.runner import InfluenceRunner
from mates_megatron.pool.base import CandidatePool, PoolRounds
from mates_megatron.pool.manifest import SelectionStore
from mates_megatron.probe.estimators import ESTIMATORS, ProbeContext
from mates_megatron.runtime.rng import get_rng_state, set_rng_state
from mates_megatron.runtime.schedule import collate
from mates_megatron.sampler import MatesSampler
from mates_megatron.select import RandomSelector, Selector

log = logging.getLogger("mates_megatron.hooks")


class LiveRun(Protocol):
    """What the hook needs of the training loop (Trainer and the Megatron-LM adapter provide it)."""

    def probe_context(self) -> ProbeContext:
        """The live model, optimizer, scheduler and the whole reference set."""
        ...


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
        warmup_rounds: int = 0,
        probe_samples: int = 0,
        estimator: str = "oracle",
        influence: InfluenceRunner | None = None,
        store: SelectionStore | None = None,
        write_files: bool = False,
    ) -> None:
        self.pool, self.rounds, self.sampler, self.selector = pool, rounds, sampler, selector
        self.select_every, self.seed, self.train_iters = select_every, seed, train_iters
        self.scored = not isinstance(selector, RandomSelector)
        if self.scored and (influence is None or warmup_rounds < 1 or probe_samples < 10):
            raise ValueError(
                "a scored selector needs an influence runner, warmup_rounds >= 1 and probe_samples >= 10"
            )
        self.warmup_rounds = warmup_rounds if self.scored else 0
        self.probe_samples, self.estimator, self.influence = probe_samples, estimator, influence
        self.store, self.write_files = store, write_files
        self.domain_share: dict[int, dict[str, float]] = {}
        self.records: dict[int, dict[str, Any]] = {}
        """Per scored round: oracle statistics, influence-model fit quality, time per phase."""
        self.oracle: dict[int, dict[str, np.ndarray]] = {}
        """Per scored round: the probed candidate ids and their oracle scores."""
        self.publish(
            0, RandomSelector().select(rounds.candidates(0), sampler.samples_per_round, seed=seed, round_=0)
        )

    # -- the round ----------------------------------------------------------------------------------------
    def publish(self, round_: int, chosen: np.ndarray) -> None:
        self.sampler.publish(round_, chosen)
        self.domain_share[round_] = self._shares(chosen)
        if self.store is not None and self.write_files:
            self.store.save(round_, chosen)

    def _shares(self, ids: np.ndarray) -> dict[str, float]:
        dom = self.pool.domain_ids(ids)
        counts = np.bincount(dom[dom >= 0], minlength=len(self.pool.domains))
        return {name: float(c) / len(ids) for name, c in zip(self.pool.domains, counts, strict=True)}

    def probe_ids(self, round_: int) -> np.ndarray:
        """The round's probe samples: a seeded draw from its candidates (positions into candidates)."""
        n = len(self.rounds.candidates(round_))
        rng = np.random.default_rng([self.seed, round_, 0x9B0BE])
        return np.sort(rng.choice(n, size=min(self.probe_samples, n), replace=False))

    def run_round(self, run: LiveRun, round_: int) -> np.ndarray:
        """Probe -> fit -> score -> select for ``round_`` on the live model; returns the selection."""
        cands = self.rounds.candidates(round_)
        k = self.sampler.samples_per_round
        if not self.scored or round_ < self.warmup_rounds:
            return RandomSelector().select(cands, k, seed=self.seed, round_=round_)
        seconds: dict[str, float] = {}
        t = time.perf_counter()
        with isolated_rng(self.seed * 1_000_003 + round_):
            positions = self.probe_ids(round_)
            batches = [collate([self.pool.training_sample(int(cands[i]))]) for i in positions]
            ctx = run.probe_context()
            probes = ESTIMATORS[self.estimator](ctx).score(batches)
            seconds["probe"] = time.perf_counter() - t
            t = time.perf_counter()
            texts = [self.pool.text(int(g)) for g in cands] if self.influence.member else []
            seconds["text"] = time.perf_counter() - t
            t = time.perf_counter()
            scores, sp, pe = self.influence.score_round(texts, positions, probes.scores)
            seconds["fit_and_score"] = time.perf_counter() - t
        t = time.perf_counter()
        chosen = self.selector.select(cands, k, scores=scores, seed=self.seed, round_=round_)
        seconds["select"] = time.perf_counter() - t
        self.oracle[round_] = {"ids": cands[positions].copy(), "scores": probes.scores.copy()}
        self.records[round_] = {
            "round": round_,
            "probes": int(len(positions)),
            "candidates": int(len(cands)),
            "estimator": probes.method,
            "reference_loss_before": probes.loss_before,
            "oracle_mean": float(probes.scores.mean()),
            "oracle_std": float(probes.scores.std()),
            "influence_spearman": sp,
            "influence_pearson": pe,
            "seconds": seconds,
        }
        return chosen

    def on_step_end(self, trainer: LiveRun, iteration: int, metrics: dict[str, float]) -> None:
        if iteration % self.select_every or iteration >= self.train_iters:
            return
        round_ = iteration // self.select_every
        t = time.perf_counter()
        self.publish(round_, self.run_round(trainer, round_))
        if round_ in self.records:
            rec = self.records[round_]
            rec["seconds"]["total"] = time.perf_counter() - t
            rec["selected_share"] = self.domain_share[round_]
            log_metrics = getattr(trainer, "log_metrics", None)
            if log_metrics is not None:
                log_metrics(iteration, self.round_metrics(round_))
            if dist.is_initialized() and dist.get_rank() == 0:
                log.info(
                    "round %d | oracle %.5f +- %.5f | influence spearman %.3f | %.1f s (%s) | share %s",
                    round_,
                    rec["oracle_mean"],
                    rec["oracle_std"],
                    rec["influence_spearman"],
                    rec["seconds"]["total"],
                    ", ".join(f"{k} {v:.1f}" for k, v in rec["seconds"].items() if k != "total"),
                    ", ".join(f"{k} {v:.2f}" for k, v in rec["selected_share"].items()),
                )

    def round_metrics(self, round_: int) -> dict[str, float]:
        """Flat scalars of a scored round for TensorBoard / W&B."""
        rec = self.records[round_]
        out = {
            "mates/round": float(round_),
            "mates/oracle_mean": rec["oracle_mean"],
            "mates/oracle_std": rec["oracle_std"],
            "mates/influence_spearman": rec["influence_spearman"],
            "mates/influence_pearson": rec["influence_pearson"],
        }
        out.update({f"mates/seconds/{k}": v for k, v in rec["seconds"].items()})
        out.update({f"mates/selected_share/{k}": v for k, v in self.domain_share[round_].items()})
        return out

    def selection_seconds(self) -> float:
        return float(sum(r["seconds"].get("total", 0.0) for r in self.records.values()))

    def summary(self) -> dict[str, Any]:
        """JSON-ready: every round's domain shares and every scored round's record."""
        return {
            "select_every": self.select_every,
            "warmup_rounds": self.warmup_rounds,
            "domains": list(self.pool.domains),
            "selected_share_by_domain": [self.domain_share[r] for r in sorted(self.domain_share)],
            "rounds": [self.records[r] for r in sorted(self.records)],
            "selection_seconds": self.selection_seconds(),
        }

    # -- checkpoint ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "pool": self.pool.fingerprint(),
            "domain_share": self.domain_share,
            "records": self.records,
            "oracle": self.oracle,
            "influence": self.influence.state_dict() if self.influence is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["pool"] != self.pool.fingerprint():
            raise ValueError(
                "the candidate pool changed since the checkpoint was written (fingerprint differs): the "
                "resumed run would train on other data; resume with the original pool"
            )
        self.domain_share = state["domain_share"]
        self.records = state.get("records", {})
        self.oracle = state.get("oracle", {})
        if self.influence is not None and state.get("influence") is not None:
            self.influence.load_state_dict(state["influence"])

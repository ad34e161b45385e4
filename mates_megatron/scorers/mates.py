"""MATES (Yu, Das, Xiong, NeurIPS 2024): probe a seeded sample of the round's candidates on the live model,
fit the data influence model on (text, probe score) pairs, predict every candidate.

Configured by its own section (``MatesConfig``: ``selection.scorer: {kind: mates, probe_samples: ...,
influence: {...}}``); its state (the influence model, every round's probe ids and scores) is checkpointed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from mates_megatron.influence.config import InfluenceConfig
from mates_megatron.pool.base import candidate_inputs
from mates_megatron.probe.context import ProbeContext
from mates_megatron.probe.estimators import ESTIMATORS
from mates_megatron.runtime.schedule import collate
from mates_megatron.scorers.base import SCORERS, PendingScores, RoundInput, Scorer, ScorerContext, Scores

MIN_PROBES = 10
PROBE_TOKENS = ("target", "all")


@dataclass
class MatesConfig:
    """Options of the 'mates' and 'static' scorers (``selection.scorer: {kind: mates, ...}``)."""

    probe_samples: int = 256
    """Probe samples per round: drawn afresh (seeded) from the next round's candidates, scored on the live
    model, and used as the influence model's training pairs."""
    estimator: str = "linearized"
    """How probes are scored (mates_megatron.probe.estimators.ESTIMATORS): 'linearized' (the oracle's
    first-order form: one reference gradient per round and one gradient and optimizer step per probe),
    'forward' (the same first order by forward passes only: each probe's loss derivative along the reference
    gradient preconditioned by Adam's second moment, two batched forward passes of all probes per round;
    `bench probe --config` measures it against the oracle at each scored round), 'oracle' (one optimizer
    step, then the whole reference loss, per probe: the paper, and about a reference set's worth of forward
    passes per probe), 'mirrored' (one reference step, forward only) or 'rollout' (Group-MATES's oracle:
    rollouts of 10 probes trained on in order, each probe scored by its step's reference-loss change given the
    steps before it; the cost of 'oracle') or 'linearized_rollout' (the same rollouts to first order: the cost
    of 'linearized')."""
    probe_tokens: str = "target"
    """Which reference tokens the probes' reference loss counts: 'target' (the LAMBADA form: the last word
    only, the same loss the run reports) or 'all' (every token of each reference example, context and target:
    a language-modelling loss on the reference text, far less noisy per probe and harder to win with data that
    only teaches word frequencies)."""
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    """The data influence model and its fitting."""
    influence_rounds: int = 1
    """Fit each round's influence model on the probes of this round and of the previous influence_rounds - 1
    scored rounds, each round's probe scores z-scored within their round (the probes of past rounds are read
    again from the pool by id, and predicted once more beside the candidates). 1: this round's probes only
    (the paper). More rounds smooth the selection across rounds: a round whose oracle has little to say (a
    small spread between domains) no longer decides the whole selection alone, at the cost of following the
    live model's newest preference more slowly. The poor-fit guard reads the fit's cross-validated Spearman
    over all its pairs: rounds that disagree lower it."""
    min_influence_spearman: float = 0.1
    """Poor-fit guard: a round whose influence model's cross-validated Spearman against the probes is below
    this (or undefined) is not selected by its scores: it falls back to a uniform random draw of the round
    (seeded like the warm-up rounds), logged as the round's ``fallback``. -1 turns the guard off."""

    def __post_init__(self) -> None:
        if self.probe_samples < MIN_PROBES:
            raise ValueError(
                f"MatesConfig.probe_samples={self.probe_samples}: the influence model needs at least "
                f"{MIN_PROBES} (text, score) pairs per round; the paper uses thousands"
            )
        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"MatesConfig.estimator={self.estimator!r}: choose one of {', '.join(ESTIMATORS.names())}"
            )
        if self.probe_tokens not in PROBE_TOKENS:
            raise ValueError(f"MatesConfig.probe_tokens={self.probe_tokens!r}: use 'target' or 'all'")
        if self.influence_rounds < 1:
            raise ValueError(
                f"MatesConfig.influence_rounds={self.influence_rounds} must be >= 1 (1: this round's probes "
                "only, the paper)"
            )
        if not -1 <= self.min_influence_spearman <= 1:
            raise ValueError(
                f"MatesConfig.min_influence_spearman={self.min_influence_spearman} must be in [-1, 1] "
                "(-1: no guard)"
            )


def oracle_by_domain(pool, ids: np.ndarray, scores: np.ndarray) -> dict[str, dict[str, float]]:
    """Per domain of the probed candidates: how many, their mean oracle score and its standard error (what
    the live model prefers this round, before the influence model generalises it)."""
    dom = pool.domain_ids(ids)
    names = list(pool.domains)
    out = {}
    for d in np.unique(dom):
        s = scores[dom == d]
        name = names[int(d)] if 0 <= d < len(names) else "unknown"
        se = float(s.std(ddof=1) / np.sqrt(len(s))) if len(s) > 1 else float("nan")
        out[name] = {"n": int(len(s)), "mean": float(s.mean()), "se": se}
    return out


def _zscore(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x - x.mean()) / (x.std() or 1.0)


def fit_pairs(
    oracle: dict[int, dict[str, np.ndarray]],
    rounds: int,
    round_: int,
    cands: np.ndarray,
    positions: np.ndarray,
    scores: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """What the influence model is fitted on and predicts in ``round_``: (ids, fit positions into them, fit
    scores, rounds fitted on). ``oracle``: the earlier scored rounds' probe ids and scores.

    ``rounds`` (``MatesConfig.influence_rounds``) = 1, or no earlier scored round: the round's candidates
    and its probes, unchanged. Otherwise the probes of the last ``rounds - 1`` earlier scored rounds are
    appended after the candidates, and every round's scores are z-scored within their round (the oracle's
    scale shrinks as the model trains, so raw scores would let the earliest round dominate the fit).
    """
    past = sorted(p for p in oracle if p < round_)[-(rounds - 1) :] if rounds > 1 else []
    if not past:
        return cands, positions, scores, [round_]
    extra = np.concatenate([oracle[p]["ids"] for p in past])
    ids = np.concatenate([cands, extra])
    fit_positions = np.concatenate([positions, len(cands) + np.arange(len(extra))])
    fit_scores = np.concatenate([_zscore(scores)] + [_zscore(oracle[p]["scores"]) for p in past])
    return ids, fit_positions, fit_scores, [*past, round_]


class ProbeBatches(Sequence):
    """The probe samples as one-row batches, each read from the pool when it is first indexed and kept.

    An estimator indexes only this rank's share of the probes (strided over data-parallel replicas; all of
    them under the distributed optimizer), so each rank reads and holds its share, never the whole round's.
    """

    def __init__(self, pool, ids: np.ndarray) -> None:
        self.pool, self.ids = pool, ids
        self._built: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        if not -len(self.ids) <= i < len(self.ids):
            raise IndexError(f"probe {i} of {len(self.ids)}")
        i = int(i) % len(self.ids)
        if i not in self._built:  # the mirrored estimator reads each probe twice (before and after its step)
            self._built[i] = collate([self.pool.training_sample(int(self.ids[i]))])
        return self._built[i]


def poor_fit(spearman: float, threshold: float) -> str | None:
    """The guard's reason when the influence fit is too poor to select by (None: select by the scores)."""
    if threshold <= -1:
        return None
    if not np.isfinite(spearman) or spearman < threshold:
        return (
            f"the influence model's cross-validated Spearman {spearman:.3f} is below "
            f"selection.scorer_options.min_influence_spearman={threshold}"
        )
    return None


@SCORERS.register("mates")
class MatesScorer(Scorer):
    needs: ClassVar[frozenset[str]] = frozenset({"live_model", "reference", "text"})
    has_influence_stage: ClassVar[bool] = True
    """Its fit and predict need no live model and can run asynchronously (``SelectionConfig.asynchronous``)."""

    Config: ClassVar[type] = MatesConfig

    def __init__(self, config: MatesConfig | None = None, *, context: ScorerContext, **_: Any) -> None:
        super().__init__(config or MatesConfig(), context=context)
        from mates_megatron.influence.runner import InfluenceRunner

        if context.asynchronous and context.pool is None:
            raise ValueError(
                "SelectionConfig.asynchronous: the 'mates' scorer needs the pool for its influence workers "
                "(build it through mates_megatron.plugin.build_plugin, or give ScorerContext(pool=...))"
            )
        # Collective: the influence model's process group is created here, on every rank.
        self.influence = InfluenceRunner(
            self.config.influence,
            ranks=context.influence_ranks,
            device=context.device,
            pool=context.pool if context.asynchronous else None,
            imports=context.imports,
        )
        self.oracle: dict[int, dict[str, np.ndarray]] = {}
        """Per scored round: the probed candidate ids and their probe scores."""

    @classmethod
    def reads_token_ids(cls, config: MatesConfig) -> bool:
        return config.influence.pass_token_ids

    @classmethod
    def projected_cost(cls, config: MatesConfig, selection, **shape: Any):
        from mates_megatron.cost import project_mates_round

        return project_mates_round(selection, config, **shape)

    def probe_positions(self, round_: int, n: int) -> np.ndarray:
        """The round's probe samples: a seeded draw of positions into its candidates."""
        rng = np.random.default_rng([self.context.seed, round_, 0x9B0BE])
        return np.sort(rng.choice(n, size=min(self.config.probe_samples, n), replace=False))

    def estimator(self, ctx: ProbeContext):
        """The round's estimator on the live model (``config.estimator``)."""
        return ESTIMATORS.get(self.config.estimator)(ctx)

    def influence_ids(self, ids: np.ndarray, fit_positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What the influence stage predicts, and the fit's positions in it: here every id (the candidates,
        then past rounds' probes); a subclass that predicts elsewhere narrows it."""
        return ids, fit_positions

    def score(self, r: RoundInput) -> Scores:
        return self.begin(r).result()

    def begin(self, r: RoundInput) -> PendingScores:
        """Probe on the live model now; the influence stage runs on (asynchronous: beside training)."""
        sel, cands, pool = self.config, r.candidates, r.pool
        seconds: dict[str, float] = {}
        t = time.perf_counter()
        positions = self.probe_positions(r.round, len(cands))
        batches = ProbeBatches(pool, cands[positions])
        reference = r.host.reference
        if reference is None:
            raise ValueError("scorer 'mates' probes against a reference set: the host has none configured")
        if sel.probe_tokens == "all":
            reference = reference.with_all_tokens()
        reference = reference.trimmed()  # no passes over the rows' right padding
        ctx = ProbeContext.from_host(r.host, reference.micro_batches(r.host.micro_batch_size))
        probes = self.estimator(ctx).score(batches)
        seconds["probe"] = time.perf_counter() - t
        ids, fit_positions, fit_scores, fit_rounds = fit_pairs(
            self.oracle, sel.influence_rounds, r.round, cands, positions, probes.scores
        )
        ids, fit_positions = self.influence_ids(ids, fit_positions)
        # Read on access: each influence member reads the probes and its own shard, streaming.
        inputs = candidate_inputs(pool, ids, token_ids=sel.influence.pass_token_ids)
        self.influence.submit(ids, inputs, fit_positions, fit_scores)
        self.oracle[r.round] = {"ids": cands[positions].copy(), "scores": probes.scores.copy()}
        by_domain = oracle_by_domain(pool, cands[positions], probes.scores)

        def finish() -> Scores:
            scores, sp, pe, fit_seconds = self.influence.collect()
            scores = scores[: len(cands)]  # past rounds' probes, appended for the fit, are not candidates
            seconds["fit_and_score"] = fit_seconds
            record = {
                "probes": int(len(positions)),
                "fit_rounds": fit_rounds,
                "fit_pairs": int(len(fit_positions)),
                "estimator": probes.method,
                "reference_loss_before": probes.loss_before,
                "oracle_mean": float(probes.scores.mean()),
                "oracle_std": float(probes.scores.std()),
                "influence_spearman": sp,
                "influence_pearson": pe,
                "oracle_by_domain": by_domain,
                "seconds": seconds,
            }
            return Scores(scores, record, fallback=poor_fit(sp, sel.min_influence_spearman))

        return PendingScores(finish=finish)

    def close(self) -> None:
        self.influence.close()

    def state_dict(self) -> dict[str, Any]:
        return {"oracle": self.oracle, "influence": self.influence.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.oracle = state["oracle"]
        if state.get("influence") is not None:
            self.influence.load_state_dict(state["influence"])


@SCORERS.register("static")
class StaticScorer(MatesScorer):
    """The paper's static comparison (its Figure 5): the MATES influence model fitted once, on the probes of
    the first scored round, then reused to score every later round without new probes, so the selection
    follows the model as it was at that round rather than the model being trained.

    Its fit is MATES's (same probes, estimator and influence model), so only the updating differs. The
    first round's poor-fit guard applies to every round (they all use that fit). Synchronous only: with no
    probes after the first round there is nothing to overlap with training.
    """

    @classmethod
    def check_config(cls, config: MatesConfig, context: ScorerContext) -> None:
        super().check_config(config, context)
        if context.asynchronous:
            raise ValueError(
                "scorer 'static' fits once and then only predicts: set asynchronous: false (nothing to overlap)"
            )

    def __init__(self, config: MatesConfig | None = None, *, context: ScorerContext, **kw: Any) -> None:
        super().__init__(config, context=context, **kw)
        self.fit_round: int | None = None
        self.fit_spearman = float("nan")

    def begin(self, r: RoundInput) -> PendingScores:
        if self.fit_round is None:
            pending = super().begin(r)

            def first() -> Scores:
                out = pending.result()
                self.fit_round, self.fit_spearman = r.round, out.record["influence_spearman"]
                out.record["fit_round"] = r.round
                return out

            return PendingScores(finish=first)
        t = time.perf_counter()
        inputs = candidate_inputs(r.pool, r.candidates, token_ids=self.config.influence.pass_token_ids)
        scores, _, _, _ = self.influence.predict_only(r.candidates, inputs)
        record = {
            "fit_round": self.fit_round,
            "influence_spearman": self.fit_spearman,
            "seconds": {"fit_and_score": time.perf_counter() - t},
        }
        fallback = poor_fit(self.fit_spearman, self.config.min_influence_spearman)
        return PendingScores(Scores(scores, record, fallback=fallback))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "fit_round": self.fit_round, "fit_spearman": self.fit_spearman}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.fit_round, self.fit_spearman = state["fit_round"], float(state["fit_spearman"])

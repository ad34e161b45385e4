"""A quality classifier, reference vs pool, on hashed word n-grams (DCLM-baseline style), as a static
baseline scorer ('classifier'): score = minus P(reference | text). Meant for ``selector: topk``.

Features: scikit-learn's ``HashingVectorizer`` (word 1..``ngram_max``-grams, ``n_features`` buckets, no
alternating sign, l2-normalised rows); model: ``LogisticRegression`` (L2, lbfgs). Positives are the
reference examples (context + target, or text); negatives a seeded sample of the *pool*,
``negatives_per_positive`` times as many (sorted ids, read once).

Fitted once, at the first scored round, and kept: a static classifier scores every round with the same
function, as DCLM's is trained once and then applied. Its training set depends only on (selection seed,
pool, reference, options), not on the round it is first needed in, so a resumed run refits exactly the same
model and the scorer checkpoints nothing. The fit is deterministic and identical on every rank: hashing is
deterministic, and lbfgs runs on one thread (its result differs in the last bits between thread counts,
which ranks need not share); scoring is single-threaded sparse products. It needs no live model, so it needs
no warm-up (round 0 itself is always a random draw: the hook publishes it before the run starts).

Memory and scale: the fit holds (1 + negatives_per_positive) x reference-size sparse rows and an
``n_features`` weight vector (2 MB at 2**18); scoring streams the round's candidates in chunks of
``chunk_size`` (memory O(chunk_size)). Under torch.distributed the scoring is sharded: each rank of the world
reads, hashes and scores its contiguous block of the round, and the scores are all-gathered on a gloo group
(``influence.group.influence_group``), so a rank's scoring work is n / world; the scores are bitwise those of
one process (each row's probability depends on that row alone). Every rank fits the (small) model itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mates_megatron.influence.group import world_group
from mates_megatron.pool.base import candidate_inputs
from mates_megatron.probe.reference import reference_texts
from mates_megatron.scorers.base import SCORERS, RoundInput, Scorer, ScorerContext, Scores


@dataclass
class ClassifierConfig:
    """Options of the 'classifier' scorer (``selection.scorer_options``)."""

    n_features: int = 2**18
    """Hash buckets of the word n-gram features."""
    ngram_max: int = 2
    """Largest n of the word n-grams (2: unigrams and bigrams)."""
    negatives_per_positive: float = 1.0
    """Pool samples drawn as negatives per reference example (capped at the pool size)."""
    C: float = 1.0
    """Inverse L2 regularisation strength of the logistic regression."""
    max_iter: int = 1000
    """lbfgs iterations at most."""
    chunk_size: int = 4096
    """Candidates scored at a time."""

    def __post_init__(self) -> None:
        if self.n_features < 2:
            raise ValueError(f"ClassifierConfig.n_features={self.n_features} must be >= 2 (e.g. 262144)")
        if self.ngram_max < 1:
            raise ValueError(f"ClassifierConfig.ngram_max={self.ngram_max} must be >= 1 (2: uni+bigrams)")
        if not self.negatives_per_positive > 0:
            raise ValueError(
                f"ClassifierConfig.negatives_per_positive={self.negatives_per_positive} must be > 0"
            )
        if not self.C > 0:
            raise ValueError(f"ClassifierConfig.C={self.C} must be > 0")
        if self.max_iter < 1:
            raise ValueError(f"ClassifierConfig.max_iter={self.max_iter} must be >= 1")
        if self.chunk_size < 1:
            raise ValueError(f"ClassifierConfig.chunk_size={self.chunk_size} must be >= 1")


@SCORERS.register("classifier")
class ClassifierScorer(Scorer):
    """Score = minus the classifier's probability that a candidate is reference text."""

    needs: ClassVar[frozenset[str]] = frozenset({"reference", "text"})
    Config = ClassifierConfig

    @classmethod
    def projected_cost(cls, config, selection, **shape: Any):
        from mates_megatron.cost.ngram import project_ngram_round

        return project_ngram_round("classifier", config, selection, **shape)

    def __init__(
        self, config: ClassifierConfig | None = None, *, context: ScorerContext | None = None, **_: Any
    ) -> None:
        super().__init__(config or ClassifierConfig(), context=context)
        from sklearn.feature_extraction.text import HashingVectorizer

        cfg = self.config
        self.vectorizer = HashingVectorizer(
            n_features=cfg.n_features,
            ngram_range=(1, cfg.ngram_max),
            alternate_sign=False,
            norm="l2",
            dtype=np.float64,
        )
        self.model = None
        self.fit_record: dict[str, Any] = {}

    def negative_ids(self, pool, n_positives: int) -> np.ndarray:
        """The seeded pool sample the classifier is fitted on as negatives (sorted ids)."""
        n_pool = pool.num_candidates
        n = min(max(1, int(round(self.config.negatives_per_positive * n_positives))), n_pool)
        rng = np.random.default_rng([self.context.seed, 0xC1A5])
        return np.sort(rng.choice(n_pool, size=n, replace=False)).astype(np.int32)

    def fit(self, pool, reference: Any) -> None:
        """Fit reference (1) vs the seeded pool sample (0); deterministic for the selection seed."""
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

        t = time.perf_counter()
        positives = reference_texts(reference, scorer="classifier")
        negatives = [pool.text(int(g)) for g in self.negative_ids(pool, len(positives))]
        x = self.vectorizer.transform(positives + negatives)
        y = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
        model = LogisticRegression(C=self.config.C, max_iter=self.config.max_iter, solver="lbfgs")
        with threadpool_limits(1):  # lbfgs's last bits depend on the thread count; ranks may differ in it
            model.fit(x, y)
        self.model = model
        self.fit_record = {
            "positives": len(positives),
            "negatives": len(negatives),
            "train_accuracy": float(model.score(x, y)),
            "fit_seconds": time.perf_counter() - t,
        }

    def probability(self, texts) -> np.ndarray:
        """P(reference | text) for each text."""
        return self.model.predict_proba(self.vectorizer.transform(texts))[:, 1]

    def probabilities(self, texts, group=None) -> np.ndarray:
        """P(reference | text) of every text, each member of ``group`` scoring its contiguous block in chunks of
        ``chunk_size``, all-gathered (None: this process scores all)."""
        import torch

        from mates_megatron.influence.base import gather_rows, shard

        lo, hi, per = shard(len(texts), group)
        step = self.config.chunk_size
        out = torch.zeros(per, dtype=torch.float64)
        for i in range(lo, hi, step):
            out[i - lo : min(i + step, hi) - lo] = torch.from_numpy(
                self.probability(texts[i : min(i + step, hi)])
            )
        return gather_rows(out, len(texts), group)

    def score(self, r: RoundInput) -> Scores:
        t = time.perf_counter()
        seconds: dict[str, float] = {}
        if self.model is None:
            self.fit(r.pool, r.host.reference)
            seconds["fit"] = self.fit_record["fit_seconds"]
        texts = candidate_inputs(r.pool, r.candidates, token_ids=False)
        p = self.probabilities(texts, world_group())
        record = {"classifier_" + k: v for k, v in self.fit_record.items() if k != "fit_seconds"} | {
            "probability_mean": float(p.mean()),
            "probability_above_half": float((p > 0.5).mean()),
            "seconds": seconds | {"score": time.perf_counter() - t},
        }
        return Scores(-p.astype(np.float64), record)

"""DSIR (Xie, Santurkar, Ma, Liang, NeurIPS 2023): importance resampling toward the probe reference on hashed
n-gram features, as a static baseline scorer ('dsir') and its resampler (selector 'importance').

The algorithm, as published and as the authors' ``data-selection`` package implements it:

- features: each text lowercased, split by nltk's WordPunctTokenizer (``\\w+|[^\\w\\s]+``), its word unigrams
  and bigrams (n-grams joined by a space) hashed into ``num_buckets`` buckets (10k in the paper) and counted;
- a bag-of-n-grams multinomial for the target (the reference examples, context + target, or text) and one
  for the raw data, each from the summed counts with additive smoothing (``smoothing`` per bucket, add-one
  by default; the package adds 1e-8 to the probabilities instead);
- each document's log importance weight is ``sum_b x_b (log p_target[b] - log p_raw[b])`` over its hashed
  n-gram counts ``x``; the score is its negation (lower = more useful);
- resampling: Gumbel-top-k on the raw log weights, at temperature 1 and without z-scoring, which draws k
  documents without replacement with probabilities proportional to the weights. Selector 'importance' is
  exactly that, so ``selector: importance, scorer: dsir`` is DSIR; with ``topk`` it is deterministic
  top-k by weight (the paper's "top-k" ablation). 'importance' takes no temperature (no options at all).

Library: the featurizer is scikit-learn's ``HashingVectorizer`` set up as DSIR's (the same tokenizer
pattern, lowercasing, uni+bigrams joined by a space, raw counts), not ``data-selection``'s
``get_ngram_counts``: that one hashes every n-gram with SHA-256 in Python (about 5x slower per document,
measured 1.8 vs 0.37 ms for a 400-word document) and would add nltk as a core dependency for one regular
expression, and its ``HashedNgramDSIR`` fits on files through a cache directory, not per round in memory.
The only difference is the hash function (MurmurHash3 instead of SHA-256): the buckets differ, the
estimator does not. scikit-learn is needed anyway (the 'classifier' scorer).

Raw distribution: fitted on the round's candidates (all of them, or a seeded sample of ``raw_samples``).
The paper fits it on the raw dataset; a round's candidates are a seeded uniform slice of the pool
(``PoolRounds``), so they are an unbiased sample of it, already being read for scoring, and the scorer keeps
no state across rounds (resume needs nothing). It needs no live model, so it needs no warm-up (round 0
itself is always a random draw: the hook publishes it before the run starts).

Memory and scale: with ``raw_samples`` unset each candidate's sparse counts are held until the raw fit is
done (about 8 bytes per distinct hashed n-gram, ~10 KB for a 2k-token sequence: ~1 GB per 100k candidates);
with ``raw_samples`` set the sample is featurized first and the round is then streamed in chunks of
``chunk_size`` candidates (memory O(chunk_size), each sampled candidate featurized twice). Under
torch.distributed the work is sharded: each rank of the world featurizes its contiguous block of the round
(and of the raw sample), the raw counts are summed by an all-reduce and the log weights all-gathered on a gloo
group, so a rank's work and memory follow n / world; the weights are bitwise those of one process (integer
counts in float64 sum exactly in any order, and each row's weight depends on that row alone).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mates_megatron.influence.base import gather_rows, shard
from mates_megatron.influence.group import world_group
from mates_megatron.pool.base import candidate_inputs
from mates_megatron.probe.reference import reference_texts
from mates_megatron.scorers.base import SCORERS, RoundInput, Scorer, ScorerContext, Scores

WORDPUNCT = r"\w+|[^\w\s]+"
"""nltk's WordPunctTokenizer pattern: the ``data-selection`` package's default tokenizer."""


def ngram_featurizer(num_buckets: int, ngrams: int):
    """DSIR's hashed n-gram counts: lowercased WordPunct tokens, 1..ngrams-grams, ``num_buckets`` buckets."""
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(
        n_features=num_buckets,
        ngram_range=(1, ngrams),
        token_pattern=WORDPUNCT,
        lowercase=True,
        alternate_sign=False,
        norm=None,
        dtype=np.float32,  # counts: exact, half the memory of float64
    )


def bucket_counts(features) -> np.ndarray:
    """Summed counts per bucket (float64: exact well past float32's 2**24)."""
    return np.asarray(features.sum(axis=0, dtype=np.float64)).ravel()


def summed_counts(counts: list[np.ndarray], num_buckets: int, group=None) -> np.ndarray:
    """The per-bucket sum of ``counts`` over this process's chunks and, given ``group``, over its members (an
    all-reduce: integer counts in float64 sum exactly in any order)."""
    import torch
    import torch.distributed as dist

    raw = sum(counts, np.zeros(num_buckets))
    if group is not None:
        t = torch.from_numpy(raw)
        dist.all_reduce(t, group=group)
        raw = t.numpy()
    return raw


def log_ratio(target_counts: np.ndarray, raw_counts: np.ndarray, smoothing: float) -> np.ndarray:
    """``log p_target - log p_raw`` per bucket, each multinomial from its counts with additive smoothing."""
    b = len(target_counts)
    p_target = (target_counts + smoothing) / (target_counts.sum() + smoothing * b)
    p_raw = (raw_counts + smoothing) / (raw_counts.sum() + smoothing * b)
    return np.log(p_target) - np.log(p_raw)


@dataclass
class DSIRConfig:
    """Options of the 'dsir' scorer (``selection.scorer_options``)."""

    num_buckets: int = 10_000
    """Hash buckets of the n-gram features (10k in the paper)."""
    ngrams: int = 2
    """Largest n of the word n-grams (2: unigrams and bigrams, as in the paper)."""
    smoothing: float = 1.0
    """Pseudo-count added to every bucket of both multinomials (1: add-one). It weighs more the smaller the
    reference is against ``num_buckets``: with a few hundred reference n-grams in 10k buckets add-one pulls
    the target toward uniform; lower it (or num_buckets) for a tiny reference."""
    raw_samples: int | None = None
    """Candidates of the round the raw distribution is fitted on: None = all of them; else a seeded sample
    of that many (then the round is streamed; see the module docstring)."""
    chunk_size: int = 4096
    """Candidates featurized at a time."""

    def __post_init__(self) -> None:
        if self.num_buckets < 2:
            raise ValueError(f"DSIRConfig.num_buckets={self.num_buckets} must be >= 2 (the paper uses 10000)")
        if self.ngrams < 1:
            raise ValueError(f"DSIRConfig.ngrams={self.ngrams} must be >= 1 (2: unigrams and bigrams)")
        if not self.smoothing > 0:
            raise ValueError(
                f"DSIRConfig.smoothing={self.smoothing} must be > 0 (an empty bucket would get log 0)"
            )
        if self.raw_samples is not None and self.raw_samples < 1:
            raise ValueError(
                f"DSIRConfig.raw_samples={self.raw_samples} must be >= 1, or null to fit on every candidate"
            )
        if self.chunk_size < 1:
            raise ValueError(f"DSIRConfig.chunk_size={self.chunk_size} must be >= 1")


@SCORERS.register("dsir")
class DSIRScorer(Scorer):
    """Score = minus the DSIR log importance weight toward the reference (lower = more reference-like)."""

    needs: ClassVar[frozenset[str]] = frozenset({"reference", "text"})
    Config = DSIRConfig

    @classmethod
    def projected_cost(cls, config, selection, **shape: Any):
        from mates_megatron.cost.ngram import project_ngram_round

        return project_ngram_round("dsir", config, selection, **shape)

    def __init__(
        self, config: DSIRConfig | None = None, *, context: ScorerContext | None = None, **_: Any
    ) -> None:
        super().__init__(config or DSIRConfig(), context=context)
        self.featurizer = ngram_featurizer(self.config.num_buckets, self.config.ngrams)
        self._target: tuple[str, np.ndarray] | None = None

    def target_counts(self, reference: Any) -> np.ndarray:
        """The reference's summed n-gram counts (computed once per reference file)."""
        if self._target is None or self._target[0] != reference.path:
            texts = reference_texts(reference, scorer="dsir")
            self._target = (reference.path, bucket_counts(self.featurizer.transform(texts)))
        return self._target[1]

    def _chunks(self, texts, lo: int = 0, hi: int | None = None):
        step, hi = self.config.chunk_size, len(texts) if hi is None else hi
        for i in range(lo, hi, step):
            yield self.featurizer.transform(texts[i : min(i + step, hi)])

    def score(self, r: RoundInput) -> Scores:
        import torch

        cfg, cands = self.config, np.asarray(r.candidates)
        t = time.perf_counter()
        group = world_group()
        target = self.target_counts(r.host.reference)
        texts = candidate_inputs(r.pool, cands, token_ids=False)
        lo, hi, per = shard(len(cands), group)
        if cfg.raw_samples is None or cfg.raw_samples >= len(cands):
            held = list(self._chunks(texts, lo, hi))  # this rank's block, featurized once
            raw = summed_counts([bucket_counts(x) for x in held], cfg.num_buckets, group)
            ratio = log_ratio(target, raw, cfg.smoothing)
            parts = [x @ ratio for x in held]
            fitted_on = len(cands)
        else:
            rng = np.random.default_rng([self.context.seed, r.round, 0xD512])
            sample = np.sort(rng.choice(len(cands), size=cfg.raw_samples, replace=False))
            sampled = candidate_inputs(r.pool, cands[sample], token_ids=False)
            slo, shi, _ = shard(len(sample), group)  # this rank's block of the sample
            counts = [bucket_counts(x) for x in self._chunks(sampled, slo, shi)]
            raw = summed_counts(counts, cfg.num_buckets, group)
            ratio = log_ratio(target, raw, cfg.smoothing)
            parts = [x @ ratio for x in self._chunks(texts, lo, hi)]
            fitted_on = cfg.raw_samples
        out = torch.zeros(per, dtype=torch.float64)
        if parts:
            out[: hi - lo] = torch.from_numpy(np.concatenate(parts).astype(np.float64))
        log_w = gather_rows(out, len(cands), group)
        record = {
            "log_weight_mean": float(log_w.mean()),
            "log_weight_std": float(log_w.std()),
            "log_weight_max": float(log_w.max()),
            "raw_fit_candidates": int(fitted_on),
            "target_ngrams": float(target.sum()),
            "raw_ngrams": float(raw.sum()),
            "seconds": {"score": time.perf_counter() - t},
        }
        return Scores(-log_w, record)

"""The hashed n-gram scorers' work shared over real gloo processes ('classifier', and 'dsir' with its raw
distribution fitted on the whole round or on a sample): each rank reads and featurizes only its block of the
round (and of the sample), and every rank ends with the scores one process computes, bit for bit."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from mates_megatron.compat.spawn import run_on_ranks
from mates_megatron.probe.reference import ReferenceFile
from mates_megatron.scorers.base import RoundInput, ScorerContext
from mates_megatron.scorers.classifier import ClassifierConfig, ClassifierScorer
from mates_megatron.scorers.dsir import DSIRConfig, DSIRScorer

pytestmark = pytest.mark.distributed

WORDS = [
    "the",
    "a",
    "cat",
    "mat",
    "def",
    "return",
    "import",
    "class",
    "bond",
    "yield",
    "rate",
    "print",
    "value",
    "list",
    "error",
    "file",
    "open",
]


class _Pool:
    def __init__(self, n=80):
        rng = np.random.default_rng(5)
        self.texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 30)))) for _ in range(n)]
        self.read: list[int] = []

    @property
    def num_candidates(self):
        return len(self.texts)

    def text(self, gid):
        self.read.append(int(gid))
        return self.texts[gid]


CANDS = np.arange(70, 3, -1, dtype=np.int32)  # 67 candidates, not in id order


def _score(path, kind, raw_samples=None):
    pool = _Pool()
    host = SimpleNamespace(reference=ReferenceFile(path))
    ctx = ScorerContext(seed=3)
    if kind == "classifier":
        scorer = ClassifierScorer(ClassifierConfig(chunk_size=7), context=ctx)
        scorer.fit(pool, host.reference)  # every rank fits the same model
    else:
        scorer = DSIRScorer(DSIRConfig(num_buckets=64, chunk_size=7, raw_samples=raw_samples), context=ctx)
    pool.read.clear()
    out = scorer.score(RoundInput(2, CANDS, pool, host, 3))
    return {"scores": out.scores.tolist(), "read": pool.read}


def _blocks(ids, parts=3):
    per = -(-len(ids) // parts)
    return [ids[r * per : (r + 1) * per].tolist() for r in range(parts)]


KINDS = [("classifier", None), ("dsir", None), ("dsir", 20)]


def _score_each(path):
    return [_score(path, kind, raw_samples) for kind, raw_samples in KINDS]


def test_each_rank_scores_its_block_and_every_rank_gets_every_score(tmp_path):
    path = tmp_path / "ref.jsonl"
    path.write_text("".join(json.dumps({"text": f"def {w} return import class print"}) + "\n" for w in WORDS))
    ranks = run_on_ranks(_score_each, 3, str(path))  # one world for the three scorers: one start-up
    for i, (kind, raw_samples) in enumerate(KINDS):
        alone = _score(str(path), kind, raw_samples)
        sample = []
        if raw_samples:  # the raw fit's seeded sample is read first, then the round
            rng = np.random.default_rng([3, 2, 0xD512])
            sample = CANDS[np.sort(rng.choice(len(CANDS), size=raw_samples, replace=False))]
        assert alone["read"] == list(sample) + CANDS.tolist()
        sample_blocks = _blocks(np.asarray(sample)) if raw_samples else [[]] * 3
        for got, block, drawn in zip(ranks, _blocks(CANDS), sample_blocks, strict=True):
            assert got[i]["scores"] == alone["scores"], kind
            assert got[i]["read"] == drawn + block, kind  # ceil(67 / 3) = 23 candidates a rank

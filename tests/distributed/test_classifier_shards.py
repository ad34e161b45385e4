"""The classifier's scoring shared over real gloo processes: each rank reads and scores only its block of the
round, and every rank ends with the scores one process computes, bit for bit."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from mates_megatron.compat.spawn import run_on_ranks
from mates_megatron.probe.reference import ReferenceFile
from mates_megatron.scorers.base import RoundInput, ScorerContext
from mates_megatron.scorers.classifier import ClassifierConfig, ClassifierScorer

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


def _score(path):
    pool = _Pool()
    scorer = ClassifierScorer(ClassifierConfig(chunk_size=7), context=ScorerContext(seed=3))
    host = SimpleNamespace(reference=ReferenceFile(path))
    scorer.fit(pool, host.reference)  # every rank fits the same model
    pool.read.clear()
    out = scorer.score(RoundInput(2, CANDS, pool, host, 3))
    return {"scores": out.scores.tolist(), "read": pool.read}


def test_each_rank_scores_its_block_and_every_rank_gets_every_score(tmp_path):
    path = tmp_path / "ref.jsonl"
    path.write_text("".join(json.dumps({"text": f"def {w} return import class print"}) + "\n" for w in WORDS))
    alone = _score(str(path))
    assert alone["read"] == CANDS.tolist()
    ranks = run_on_ranks(_score, 3, str(path))
    blocks = [CANDS[0:23], CANDS[23:46], CANDS[46:67]]  # ceil(67 / 3) = 23 a rank
    for got, block in zip(ranks, blocks, strict=True):
        assert got["scores"] == alone["scores"]
        assert got["read"] == block.tolist()

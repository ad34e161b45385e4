"""`mates-megatron bench round` at toy sizes: every phase runs on real ranks, the JSON holds the issue's keys,
the memory model reproduces its own measurements, and the paper projection is the cost model's."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.distributed]


def test_bench_round_reports_phases_memory_and_the_paper_projection():
    from mates_megatron.bench.rounds import PAPER_CANDIDATES, PAPER_RANKS, SyntheticTokenPool, bench_round

    sizes = [2_000, 8_000, 16_000]
    r = bench_round(sizes, ranks=2, seq_length=32, probes=64, batch_size=64)
    assert r["sizes"] == sizes and len(r["seconds_per_phase"]) == len(r["peak_rss_bytes"]) == 3
    for phases in r["seconds_per_phase"]:
        assert set(phases) == {"split", "fit", "predict_and_gather", "select", "publish"}
        assert all(v >= 0 for v in phases.values())
    # Prediction is per candidate: it takes longer on the larger round.
    assert r["seconds_per_phase"][2]["predict_and_gather"] > r["seconds_per_phase"][0]["predict_and_gather"]
    assert all(p > 100e6 for p in r["peak_rss_bytes"])  # a process with torch and the encoder loaded
    m = r["memory_model"]
    assert m["bytes_per_candidate_of_the_round"] >= 0 and m["bytes_per_candidate_of_the_shard"] >= 0
    projected = (
        m["base_bytes"]
        + m["bytes_per_candidate_of_the_round"] * PAPER_CANDIDATES
        + m["bytes_per_candidate_of_the_shard"] * PAPER_CANDIDATES / PAPER_RANKS
    )
    assert r["peak_rss_gb_per_rank_paper"] == pytest.approx(projected / 1e9, abs=1e-3)
    # The paper projection is the cost model's (tests/unit/test_cost.py checks those figures).
    assert r["overhead_fraction_paper_1b"] == pytest.approx(0.0377, abs=0.0005)
    assert r["overhead_fraction_paper_1b_bert_base"] == pytest.approx(0.1765, abs=0.0005)
    assert r["cost_model"]["paper_1b"]["oracle_minilm"]["fraction"] > 20

    from transformers import AutoTokenizer

    from mates_megatron.influence.config import InfluenceConfig

    tok = AutoTokenizer.from_pretrained(str(InfluenceConfig().resolved_path()), local_files_only=True)
    pool = SyntheticTokenPool(10, 32, tok, seed=0)
    # Candidates depend on their id alone, in the encoder's ordinary word pieces.
    assert np.array_equal(pool.tokens(3), SyntheticTokenPool(10, 32, tok, seed=0).tokens(3))
    assert not np.array_equal(pool.tokens(3), pool.tokens(4))
    assert pool.tokens(3).min() >= 1996 and isinstance(pool.text(3), str)

"""`mates-lab bench round` at toy sizes: every phase runs on real ranks and is set beside its projection,
the JSON holds the issue's keys, the memory model reproduces its own measurements, and the paper projection is
the cost model's."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.distributed]


def test_bench_round_reports_phases_memory_and_the_paper_projection():
    from mates_lab.bench.rounds import PAPER_CANDIDATES, PAPER_RANKS, SyntheticTokenPool, bench_round

    sizes = [1_000, 2_000, 4_000]
    r = bench_round(sizes, ranks=2, seq_length=32, probes=64, batch_size=64, gpt_probes=0)
    assert r["sizes"] == sizes and len(r["seconds_per_phase"]) == len(r["peak_rss_bytes"]) == 3
    for phases in r["seconds_per_phase"] + r["cpu_seconds_per_phase"]:
        assert set(phases) == {"split", "fit", "predict_and_gather", "select", "publish"}
        assert all(v >= 0 for v in phases.values())
    # Fit and prediction of every size, measured beside the projection with the ranks' calibration and the preset.
    rows = {(row["phase"], row["machine"]): row for row in r["phases_measured_vs_projected"]}
    for n in sizes:
        for phase in ("fit", "predict_and_gather"):
            for machine in ("calibrated", "preset"):
                row = rows[f"influence_{n}.{phase}", machine]
                assert row["measured_s"] > 0 and row["projected_s"] > 0
                assert row["ratio"] == pytest.approx(row["measured_s"] / row["projected_s"], rel=0.01)
    assert set(r["within_30_percent"]) == {"calibrated", "preset"}
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
    # The paper projection is the corrected cost model's (tests/unit/test_cost.py checks those figures).
    paper = r["cost_model"]["paper_1b"]
    assert r["overhead_fraction_paper_1b"] == pytest.approx(0.560, abs=0.01)
    assert paper["linearized_minilm_ddp_padded_host"]["flop_fraction"] == pytest.approx(0.0377, abs=0.0005)
    assert paper["linearized_minilm_ddp_padded_host"]["dominant"] == "predict.decode_tokenise"
    assert paper["oracle_minilm_ddp_padded_host"]["fraction"] > 20
    # Every replica probes every sample under the distributed optimizer for the linearized estimator only.
    assert paper["linearized_minilm_distopt_padded_host"]["probes_per_rank"] == 80_000
    assert paper["forward_minilm_distopt_padded_host"]["probes_per_rank"] == 10_000
    assert "not under 5%" in r["paper_1b_verdict"]

    from transformers import AutoTokenizer

    from mates_megatron.influence.config import InfluenceConfig

    tok = AutoTokenizer.from_pretrained(str(InfluenceConfig().resolved_path()), local_files_only=True)
    pool = SyntheticTokenPool(10, 32, tok, seed=0)
    # Candidates depend on their id alone, in the encoder's ordinary word pieces.
    assert np.array_equal(pool.tokens(3), SyntheticTokenPool(10, 32, tok, seed=0).tokens(3))
    assert not np.array_equal(pool.tokens(3), pool.tokens(4))
    assert pool.tokens(3).min() >= 1996 and isinstance(pool.text(3), str)


def test_the_probe_phase_is_measured_beside_its_projection(small_embedded):
    """Every estimator's parts and a training step on a tiny GPT, each with a projection from the constants
    calibrated in the same process and from the preset."""
    from mates_lab.bench.round_probes import ESTIMATORS, compare, measure_probe_phases

    gpt = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32}
    r = measure_probe_phases(
        str(small_embedded["dir"]),
        gpt=gpt,
        micro_batch_size=4,
        probes=4,
        oracle_probes=2,
        reference=8,
        steps=1,
        repeats=2,
    )
    assert r["gpt"]["parameters"] == r["gpt"]["parameters_counted_in_the_model"]
    assert (
        r["probes"] == {"forward": 4, "linearized": 4, "mirrored": 4, "oracle": 2}
        and r["reference_rows"] == 8
    )
    expected = {
        "forward": {"reference", "forward", "restore", "rest"},
        "linearized": {"reference", "forward_backward", "optimizer_step", "dot", "restore", "rest"},
        "mirrored": {"reference", "forward", "forward_backward", "optimizer_step", "rest"},
        "oracle": {"reference", "forward_backward", "optimizer_step", "reference_loss", "restore", "rest"},
    }
    for name in ESTIMATORS:
        assert set(r["measured"][name]) == expected[name] and len(r["runs"][name]) == 2
        for part, secs in r["measured"][name].items():  # the median of the two runs
            assert secs == pytest.approx(sum(run[part] for run in r["runs"][name]) / 2)
        for label in ("calibrated", "preset"):
            assert set(r["projected"][label][name]) == expected[name]
    rows = compare(r["measured"], r["projected"]["calibrated"])
    assert {row["phase"] for row in rows} >= {"training.step", "linearized.total", "forward.forward"}
    assert all(row["projected_s"] > 0 and row["measured_s"] >= 0 for row in rows)

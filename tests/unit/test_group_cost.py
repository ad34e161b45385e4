"""The projected cost of a Group-MATES round: the linearized rollout's probe phase, the cluster-greedy step by hand
(its k-means quadratic in the round, its greedy linear), each candidate embedded once, and the paper round refused
in one shard and admitted in shards."""

from __future__ import annotations

import dataclasses

import pytest

from mates_lab.bench.group_step import group_selection
from mates_megatron.config import SelectionConfig
from mates_megatron.configio import build, load_yaml
from mates_megatron.cost import MACHINES, Layout, TransformerShape, check_round_cost, project_mates_round
from mates_megatron.cost.group import group_parts, project_group_mates_round
from mates_megatron.scorers.group_mates import GroupMatesConfig

HOST = dataclasses.replace(MACHINES["h100"], host_flops=1e9, matmul_flops=1e12, memory_bandwidth=1e12)
GPT_1B = TransformerShape(16, 2048, 8192, 50304, num_attention_heads=8, tied_embeddings=False)
PAPER = {"model": GPT_1B, "seq_length": 1024, "global_batch_size": 512, "reference_rows": 5153,
         "layout": Layout(dp=8, micro_batch_size=16, bf16=True), "machine": "h100"}  # fmt: skip


def test_the_group_step_by_hand_kmeans_quadratic_and_greedy_linear_in_the_round():
    p = group_parts(9000, 1800, dim=4, cluster_size=3000, kmeans_iters=10, machine=HOST)
    assert p["kmeans"] == pytest.approx(10 * 2 * 9000 * 3 * 4 / 1e9)  # 3 clusters
    # a pick: its cluster's 3,000 x 4 embeddings, FLOPs at 1e9/s (memory at 1e12 B/s is faster)
    assert p["greedy"] == pytest.approx(1800 * 2 * 3000 * 4 / 1e9)
    twice = group_parts(18000, 3600, dim=4, cluster_size=3000, kmeans_iters=10, machine=HOST)
    assert twice["kmeans"] == pytest.approx(4 * p["kmeans"]) and twice["greedy"] == pytest.approx(
        2 * p["greedy"]
    )
    # One shard per rank of 3 on the device: each rank a third of the round (a ninth of the k-means) at 1e12.
    shard = group_parts(9000, 1800, dim=4, cluster_size=3000, kmeans_iters=10, machine=HOST, ranks=3,
                        shard_size=3000, on_device=True)  # fmt: skip
    assert shard["kmeans"] == pytest.approx(p["kmeans"] / 9 / 1000)


def test_shards_make_the_kmeans_linear_in_the_round_and_the_busiest_rank_takes_the_odd_shard():
    kw = {"dim": 4, "cluster_size": 3000, "kmeans_iters": 10, "machine": HOST, "shard_size": 6000}
    one = group_parts(60000, 12000, **kw)  # 10 shards of 6,000, 2 clusters each, on one rank
    assert one["kmeans"] == pytest.approx(10 * 10 * 2 * 6000 * 2 * 4 / 1e9)
    assert group_parts(120000, 24000, **kw)["kmeans"] == pytest.approx(2 * one["kmeans"])
    spread = group_parts(60000, 12000, ranks=4, **kw)  # 10 shards on 4 ranks: 3 on the busiest
    assert spread["kmeans"] == pytest.approx(one["kmeans"] * 3 / 10)
    assert spread["greedy"] == pytest.approx(one["greedy"] * 3 / 10)


def _paper(estimator: str) -> tuple[SelectionConfig, GroupMatesConfig]:
    sel = build(SelectionConfig, load_yaml("configs/paper_1b.yaml")["selection"], where="paper_1b")
    m = sel.scorer_config
    keep = {
        f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name not in ("estimator", "influence")
    }
    inf = dataclasses.replace(m.influence, model="relational")
    return sel, GroupMatesConfig(**{**keep, "probe_samples": m.probe_samples // 10 * 10}, estimator=estimator,
                                 influence=inf)  # fmt: skip


def test_the_linearized_rollout_costs_the_linearized_probes_not_a_reference_pass_each():
    from mates_megatron.cost import project_mates_round

    sel, rollout = _paper("rollout")
    exact = project_group_mates_round(sel, rollout, **PAPER).seconds["probe"]
    first = project_group_mates_round(
        sel, dataclasses.replace(rollout, estimator="linearized_rollout"), **PAPER
    )
    mates = project_mates_round(sel, dataclasses.replace(sel.scorer_config, estimator="linearized",
                                probe_samples=rollout.probe_samples), **PAPER).seconds["probe"]  # fmt: skip
    assert "reference_loss" in exact and "reference_loss" not in first.seconds["probe"]  # a pass per probe
    assert sum(first.seconds["probe"].values()) < sum(exact.values()) / 20
    # The linearized estimator's parts, with one restore per rollout of 10 instead of one per probe.
    for part in ("reference", "forward_backward", "optimizer_step", "dot"):
        assert first.seconds["probe"][part] == pytest.approx(mates[part])
    assert first.seconds["probe"]["restore"] == pytest.approx(mates["restore"] / 10, rel=0.01)


def test_the_paper_round_is_refused_today_for_its_kmeans_and_projected_under_mates_sharded():
    sel, g = _paper("linearized_rollout")
    today = project_group_mates_round(sel, g, **PAPER)
    assert today.dominant() == ("group", "kmeans")
    with pytest.raises(ValueError, match="largest phase is group .*shard_size of selector .cluster_greedy."):
        check_round_cost(today, sel.max_selection_cost)
    designed = project_group_mates_round(sel, g, sharded=True, **PAPER)
    assert designed.seconds["group"]["kmeans"] < today.seconds["group"]["kmeans"] / 1000  # on the device
    assert designed.phase_seconds["group"] < today.phase_seconds["group"] / 50


def test_each_candidate_is_embedded_once_a_round_by_the_rank_that_selects_among_it():
    sel, g = _paper("linearized_rollout")
    raw = load_yaml("configs/paper_1b.yaml")["selection"]
    sharded = build(SelectionConfig, {**raw, **group_selection(raw, 30000)}, where="paper_1b")
    mates_cfg = dataclasses.replace(sel.scorer_config, estimator="linearized", influence=g.influence)
    mates = project_mates_round(sel, dataclasses.replace(mates_cfg, influence=dataclasses.replace(
        g.influence, model="ridge")), **PAPER)  # fmt: skip
    group = project_group_mates_round(sharded, g, **PAPER)
    n, probes = mates.counts["candidates"], mates.counts["probes"]
    pairs = g.probe_samples * g.influence_rounds
    # The influence stage predicts only the fit's pairs (MATES: every candidate, and its pairs again) ...
    per_rank = lambda c: -(-c // 8)  # noqa: E731
    assert group.seconds["predict"]["encoder"] == pytest.approx(
        mates.seconds["predict"]["encoder"] * per_rank(pairs) / per_rank(n + pairs - probes)
    )
    # ... and the busiest rank's 107 shards of 29,977 go through the encoder once, in the group step.
    assert group.seconds["group"]["embed_encoder"] == pytest.approx(
        mates.seconds["predict"]["encoder"] * 107 * 29977 / per_rank(n + pairs - probes)
    )
    # In FLOPs: every candidate once (the group step), the pairs once (the fit's prediction).
    per_candidate = mates.phases["predict"] / (n + pairs - probes)
    assert group.phases["predict"] == pytest.approx(pairs * per_candidate)
    assert group.phases["group"] > n * per_candidate


def test_the_paper_round_in_shards_over_the_world_is_admitted_decoding_or_reading_token_ids():
    sel, g = _paper("linearized_rollout")
    raw = load_yaml("configs/paper_1b.yaml")["selection"]
    sharded = build(SelectionConfig, {**raw, **group_selection(raw, 30000)}, where="paper_1b")
    mates = project_mates_round(sel, dataclasses.replace(sel.scorer_config, estimator="linearized"), **PAPER)
    host = project_group_mates_round(sharded, g, **PAPER)
    # 25.6M candidates: 854 shards of about 29,977 over the 8 ranks, 107 on the busiest, each read (decoded and
    # tokenised on the training process's thread: no loader workers) and embedded once: that part dominates,
    # as MATES's prediction does.
    assert "854 shard(s) of 29977 over 8 rank(s)" in host.assumptions[-1]
    assert host.dominant() == ("group", "embed_decode_tokenise")
    assert mates.dominant() == ("predict", "decode_tokenise")
    assert host.selection_seconds < 1.5 * mates.selection_seconds
    ids = dataclasses.replace(g.influence, pass_token_ids=True)
    tokens = project_group_mates_round(sharded, dataclasses.replace(g, influence=ids), **PAPER)
    mates_ids = project_mates_round(
        sel, dataclasses.replace(sel.scorer_config, estimator="linearized", influence=ids), **PAPER
    )
    assert tokens.selection_seconds < 1.5 * mates_ids.selection_seconds
    check_round_cost(host, sel.max_selection_cost)  # admitted
    check_round_cost(tokens, sel.max_selection_cost)


def test_a_filter_is_projected_on_its_rank_share_and_a_values_filter_costs_nothing():
    raw = load_yaml("configs/paper_1b.yaml")["selection"]
    base = {**raw, **group_selection(raw, 30000)}
    stacked = {**base, "filters": [{"kind": "classifier", "keep": 0.5}]}
    cost = project_group_mates_round(build(SelectionConfig, stacked, where="paper_1b"), **PAPER)
    n = cost.counts["candidates"] * 2  # the round's candidates, before the classifier keeps half
    rate = MACHINES["h100"].ngram_tokens_per_s
    assert cost.seconds["filters"] == {"0_classifier": pytest.approx(-(-n // 8) * 1024 / rate)}
    assert cost.dominant() == ("filters", "0_classifier")
    with pytest.raises(
        ValueError, match=r"largest phase is filters .*mates-megatron value --method classifier"
    ):
        check_round_cost(cost, 0.5)
    precomputed = {**base, "filters": [{"kind": "values", "path": "pool/values/classifier.npy", "keep": 0.5}]}
    read = project_group_mates_round(build(SelectionConfig, precomputed, where="paper_1b"), **PAPER)
    assert read.seconds["filters"] == {"0_values": 0.0}
    alone = project_group_mates_round(build(SelectionConfig, base, where="paper_1b"), **PAPER)
    # The group step sees half the round: about half its seconds (427 shards of 29,977 instead of 854).
    assert read.phase_seconds["group"] == pytest.approx(alone.phase_seconds["group"] / 2, rel=0.03)


@pytest.mark.parametrize("scorer", ["classifier", "dsir"])
def test_an_ngram_scorer_is_projected_and_refused_naming_its_precomputed_values(scorer):
    from mates_megatron.scorers import SCORERS

    raw = {**load_yaml("configs/paper_1b.yaml")["selection"], "scorer": {"kind": scorer}, "selector": "topk"}
    sel = build(SelectionConfig, raw, where="paper_1b")
    cost = SCORERS.get(scorer).projected_cost(sel.scorer_config, sel, **PAPER)
    n = sel.candidates_per_round(512)  # 25.6M: 10,000 steps x 512 / 0.2
    assert n == 25_600_000
    # Shared over the 8 ranks: 3.2M candidates of 1,024 tokens each on one host thread a rank.
    assert cost.seconds == {
        "score": {scorer: pytest.approx(3_200_000 * 1024 / MACHINES["h100"].ngram_tokens_per_s)}
    }
    assert cost.summary().endswith(f"for {n} candidates")
    # About 2 h a round against the round's training: refused by the default guard, naming the lever.
    assert cost.fraction > sel.max_selection_cost
    with pytest.raises(
        ValueError, match=r"largest phase is score .*mates-megatron value --method classifier"
    ):
        check_round_cost(cost, sel.max_selection_cost)
    # Filtered to a fifth first by a 'values' filter (computed once), the pass is a fifth.
    fifth = build(
        SelectionConfig, {**raw, "filters": [{"kind": "values", "path": "v.npy", "keep": 0.2}]}, where="f"
    )
    filtered = SCORERS.get(scorer).projected_cost(fifth.scorer_config, fifth, **PAPER)
    assert filtered.seconds["filters"] == {"0_values": 0.0}
    assert filtered.seconds["score"][scorer] == pytest.approx(cost.seconds["score"][scorer] / 5)

"""The projected cost of a Group-MATES round ('group_mates' scorer + 'cluster_greedy' selector): MATES's round
(``cost.round``, with the rollout estimator it runs), with the influence stage predicting only the fit's
pairs, plus the set selection, before it is spent.

The group phase, on the busiest rank, as the code runs it (``selectors.group``): the round is dealt into
``S = ceil(n / shard_size)`` shards (one without ``shard_size``), spread over the world's ranks, ``ceil(S / W)``
on the busiest; for each of its shards of m candidates:

- ``embed``: the shard's own scores and embeddings, one pass of the frozen encoder (``scorers.group_mates``,
  ``ShardRows``, when the selector reads them), read by the influence model's loader workers: MATES's
  prediction work, done by the selector's ranks on their shards instead of by the influence ranks;
- ``kmeans``: Lloyd iterations over the shard, ``2 x iters x m x clusters x dim`` FLOPs at the host's rate
  (scikit-learn, float64), clusters = m / cluster_size: quadratic in the shard, so in the round without
  shards and linear in it with a fixed ``shard_size``;
- ``greedy``: per cluster of c with quota q, q relationship rows of c x dim (``2 q c dim`` FLOPs), in all about
  ``2 x k x cluster_size x dim`` over the round: linear.

``sharded=True`` projects a design the code does not have: the k-means on the device, each influence rank
clustering and picking one shard of n / ranks. It is for the benchmarks' figures; the guard reads the
configuration as built.
"""

from __future__ import annotations

import math

from mates_megatron.cost.machine import Machine, get_machine
from mates_megatron.cost.phases import influence_parts
from mates_megatron.cost.round import RoundCost, project_mates_round
from mates_megatron.selectors.group import shard_count

EMBEDDING_DIM_BYTES = 8
"""The selector reads the embeddings as float64."""


def group_parts(
    candidates: int,
    k: int,
    *,
    dim: int,
    cluster_size: int,
    kmeans_iters: int,
    machine: Machine,
    ranks: int = 1,
    shard_size: int | None = None,
    on_device: bool = False,
) -> dict[str, float]:
    """Seconds of the cluster-greedy step on the busiest of ``ranks`` ranks: its shards' k-means and greedy
    (see the module), at the host's rate or, ``on_device``, the device's matmul rate."""
    n_shards = shard_count(candidates, shard_size)
    m = math.ceil(candidates / n_shards)
    mine = math.ceil(n_shards / ranks)
    q = math.ceil(k * mine / n_shards)
    clusters = max(1, round(m / cluster_size))
    rate = machine.matmul_flops if on_device else machine.host_flops
    per_cluster = min(cluster_size, m)
    return {
        "kmeans": mine * kmeans_iters * 2.0 * m * clusters * dim / rate,
        # a pick reads its cluster's embeddings once: memory-bound where the FLOPs are not
        "greedy": q
        * max(
            2.0 * per_cluster * dim / rate, per_cluster * dim * EMBEDDING_DIM_BYTES / machine.memory_bandwidth
        ),  # fmt: skip
    }


def project_group_mates_round(sel, config=None, *, sharded: bool = False, **shape) -> RoundCost:
    """``project_mates_round`` for a 'group_mates' scorer (``config``: its GroupMatesConfig; None: the run's),
    with the group phase added (see the module); the selector's options are ``sel.selector_config`` when it is
    'cluster_greedy', else its defaults."""
    from mates_megatron.cost.shapes import Layout
    from mates_megatron.selectors.group import ClusterGreedyConfig

    config = sel.scorer_config if config is None else config
    cost = project_mates_round(sel, config, **shape)
    mach = get_machine(shape.get("machine") or sel.cost_machine)
    sc = (
        sel.selector_config if isinstance(sel.selector_config, ClusterGreedyConfig) else ClusterGreedyConfig()
    )
    enc = shape.get("encoder")
    if enc is None:
        from mates_megatron.cost.shapes import TransformerShape

        enc = TransformerShape.from_encoder_dir(config.influence.resolved_path())
    n, tokens = cost.counts["candidates"], cost.counts["encoder_tokens"]
    k = sel.samples_per_round(shape["global_batch_size"])  # of the candidates the filters left
    world = (shape.get("layout") or Layout()).world
    # The influence stage predicts the fit's pairs only (the probes, and past rounds' probes): the candidates'
    # own scores come with their embeddings in the group step.
    probes, pairs = cost.counts["probes"], config.probe_samples * config.influence_rounds
    inf_ranks = len(sel.influence_ranks) if sel.influence_ranks else world
    _, cost.seconds["predict"] = influence_parts(config.influence, enc, mach, tokens=tokens, candidates=probes,
                                                 pairs=pairs, probes=probes, ranks=inf_ranks)  # fmt: skip
    per_candidate = cost.phases["predict"] / (n + pairs - probes)
    cost.phases["predict"] = pairs * per_candidate
    if sharded:  # one shard per influence rank, the k-means on the device
        ranks, shard_size = inf_ranks, math.ceil(n / inf_ranks)
    else:
        ranks, shard_size = world, sc.shard_size
    parts = group_parts(
        n, k, dim=enc.hidden_size, cluster_size=sc.cluster_size, kmeans_iters=sc.kmeans_iters, machine=mach,
        ranks=ranks, shard_size=shard_size, on_device=sharded,
    )  # fmt: skip
    n_shards = shard_count(n, shard_size)
    m = math.ceil(n / n_shards)
    mine = math.ceil(n_shards / ranks) * m  # the busiest rank's shards, each through the encoder once
    _, embed = influence_parts(config.influence, enc, mach, tokens=tokens, candidates=mine, pairs=0, probes=0,
                               ranks=1)  # fmt: skip
    cost.seconds["group"] = {"embed_" + p: s for p, s in embed.items() if p != "gather"} | parts
    clusters = max(1, round(m / sc.cluster_size))  # the FLOPs of the k-means and the greedy, every rank
    cost.phases["group"] = n * per_candidate + (
        2.0 * (sc.kmeans_iters * n * clusters + k * min(sc.cluster_size, m)) * enc.hidden_size
    )
    cost.assumptions.append(
        f"group step: {n_shards} shard(s) of {m} over {ranks} rank(s), each through the encoder once (own scores "
        "and embeddings together; the influence stage predicts only the fit's pairs), k-means "
        + ("on the device" if sharded else "and greedy on the host")
        + f" (cluster_size {sc.cluster_size}, {sc.kmeans_iters} k-means iterations, dim {enc.hidden_size})"
    )  # fmt: skip
    return cost

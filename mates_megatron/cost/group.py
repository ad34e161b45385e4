"""The projected cost of a Group-MATES round ('group_mates' scorer + 'cluster_greedy' selector): MATES's round
(``cost.round``, with the rollout estimator it runs) plus the set selection, before it is spent.

The group phase, on one rank, as the code runs it today:

- ``embed``: every candidate's embedding from the frozen encoder, computed on every rank when the round is
  published (``scorers.group_mates``), not sharded: the influence stage's prediction work again, on one rank;
- ``kmeans``: Lloyd iterations over the round's candidates, ``2 x iters x n x clusters x dim`` FLOPs at the host's
  rate (scikit-learn, float64), clusters = n / cluster_size, so it grows as n^2 / cluster_size;
- ``greedy``: per cluster of m with quota q, q relationship rows of m x dim (``2 q m dim`` FLOPs), in all about
  ``2 x k x cluster_size x dim``: linear in the round.

``sharded=True`` projects the design the note describes and the code does not have yet: the embeddings kept from
the influence stage's prediction (no second encoder pass), each influence rank clustering and picking its own
shard (n / ranks candidates, its share of k) with the k-means on the device. It is for the benchmarks' figures;
the guard reads the default.
"""

from __future__ import annotations

import math

from mates_megatron.cost.machine import Machine, get_machine
from mates_megatron.cost.phases import influence_parts
from mates_megatron.cost.round import RoundCost, project_mates_round

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
    shards: int = 1,
    on_device: bool = False,
) -> dict[str, float]:
    """Seconds of the cluster-greedy step on one rank: k-means and the greedy over ``candidates / shards``
    candidates (its share of ``k``), at the host's rate or, ``on_device``, the device's matmul rate."""
    n = math.ceil(candidates / shards)
    q = math.ceil(k / shards)
    clusters = max(1, round(n / cluster_size))
    rate = machine.matmul_flops if on_device else machine.host_flops
    per_cluster = min(cluster_size, n)
    return {
        "kmeans": kmeans_iters * 2.0 * n * clusters * dim / rate,
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
    k = math.ceil(n * sel.selection_ratio)
    ranks = len(sel.influence_ranks) if sel.influence_ranks else 1
    parts = group_parts(
        n, k, dim=enc.hidden_size, cluster_size=sc.cluster_size, kmeans_iters=sc.kmeans_iters, machine=mach,
        shards=ranks if sharded else 1, on_device=sharded,
    )  # fmt: skip
    if not sharded:  # the encoder again over every candidate, on this rank
        _, again = influence_parts(config.influence, enc, mach, tokens=tokens, candidates=n, pairs=0, probes=0,
                                   ranks=1)  # fmt: skip
        parts = {"embed_" + p: s for p, s in again.items() if p != "gather"} | parts
    cost.seconds["group"] = parts
    clusters = max(1, round(n / sc.cluster_size))  # the FLOPs of the k-means and the greedy
    cost.phases["group"] = (
        2.0 * (sc.kmeans_iters * n * clusters + k * min(sc.cluster_size, n)) * enc.hidden_size
    )
    cost.assumptions.append(
        "group step: "
        + ("embeddings kept from prediction, each influence rank clusters and picks its shard on the device"
           if sharded else "every candidate embedded again on every rank, k-means and greedy on the host over the "
           "whole round")
        + f" (cluster_size {sc.cluster_size}, {sc.kmeans_iters} k-means iterations, dim {enc.hidden_size})"
    )  # fmt: skip
    return cost

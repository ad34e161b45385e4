"""Group-MATES's set selection step (``selector: cluster_greedy``) measured beside its projection
(``mates_megatron.cost.group``), at growing round sizes, and the paper round projected as the code runs it today
and as designed (embeddings kept from prediction, each influence rank clustering its shard on the device).

Measured in this process on one intra-op thread (as under torchrun), CPU seconds: the k-means
(``selectors.group.cluster``) and the greedy over the clusters (``greedy_group`` with the selector's quotas), on
unit-normalised random embeddings of MiniLM's width, the selector's defaults (``ClusterGreedyConfig``: clusters
of about 3,000, at most 100 Lloyd iterations). Projected as the guard projects it, at the selector's iterations
(scikit-learn stops earlier where it converges, so the projection is an upper bound in iterations), with the
``cpu-2core`` preset's host rate and memory bandwidth.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np


def _cpu() -> float:
    return time.process_time()


def measure(n: int, *, dim: int = 384, ratio: float = 0.2, cluster_size: int = 3000, iters: int = 100,
            seed: int = 0) -> dict:  # fmt: skip
    """One round of ``n`` candidates: k-means and greedy CPU seconds."""
    from threadpoolctl import threadpool_limits

    from mates_megatron.selectors.group import cluster, greedy_group, quotas

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    scores = rng.standard_normal(n)
    k = int(round(ratio * n))
    clusters = max(1, round(n / cluster_size))
    with threadpool_limits(1):
        t = _cpu()
        labels = cluster(emb, clusters, seed=seed, iters=iters)  # the selector's own k-means
        kmeans = _cpu() - t
        names, sizes = np.unique(labels, return_counts=True)
        t = _cpu()
        for c, q in zip(names, quotas(sizes, k), strict=True):
            members = np.flatnonzero(labels == c)
            if q:
                greedy_group(scores[members], emb[members], int(q), alpha=1.0, temperature=1.0)
        greedy = _cpu() - t
    return {
        "candidates": n,
        "selected": k,
        "clusters": clusters,
        "kmeans_seconds": kmeans,
        "greedy_seconds": greedy,
    }


def bench_group_step(sizes: tuple[int, ...] = (12000, 24000, 48000), *, dim: int = 384) -> dict:
    """Each size measured beside its projection (the ratio measured / projected per part), and the paper_1b
    round projected with the linearized rollout today and sharded."""
    from mates_megatron.cost import MACHINES
    from mates_megatron.cost.group import group_parts
    from mates_megatron.selectors.group import ClusterGreedyConfig

    machine, cfg = MACHINES["cpu-2core"], ClusterGreedyConfig()
    rows = []
    for n in sizes:
        m = measure(n, dim=dim, cluster_size=cfg.cluster_size, iters=cfg.kmeans_iters)
        p = group_parts(n, m["selected"], dim=dim, cluster_size=cfg.cluster_size, kmeans_iters=cfg.kmeans_iters,
                        machine=machine)  # fmt: skip
        row = {**m, "kmeans_projected": p["kmeans"], "greedy_projected": p["greedy"],
               "kmeans_ratio": m["kmeans_seconds"] / p["kmeans"], "greedy_ratio": m["greedy_seconds"] / p["greedy"]}  # fmt: skip
        rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        print(f"group step, {n:,} candidates: k-means {m['kmeans_seconds']:.2f} s ("
              f"projected {p['kmeans']:.2f}), greedy {m['greedy_seconds']:.2f} s (projected {p['greedy']:.2f})")  # fmt: skip
    return {"machine": machine.name, "dim": dim, "rows": rows, "paper_1b": paper_group_cost()}


def paper_group_cost() -> dict:
    """paper_1b's round with Group-MATES (the relational model, whole rollouts of 10, MiniLM, DDP, packed
    reference rows) beside MATES's linearized round, in fractions of the round's training time on the h100 preset."""
    from mates_lab.bench.paper_cost import CONFIGS, LAMBADA_ROWS, LAMBADA_TOKENS_PER_ROW, _gpts
    from mates_megatron.config import SelectionConfig
    from mates_megatron.configio import build, load_yaml
    from mates_megatron.cost import Layout, project_mates_round
    from mates_megatron.cost.group import project_group_mates_round
    from mates_megatron.scorers.group_mates import GroupMatesConfig

    sel = build(SelectionConfig, load_yaml(CONFIGS / "paper_1b.yaml")["selection"], where="paper_1b")
    mates = sel.scorer_config
    shape = {"model": _gpts()["paper_1b"], "seq_length": 1024, "global_batch_size": 512, "machine": "h100",
             "reference_rows": LAMBADA_ROWS, "reference_tokens": LAMBADA_ROWS * LAMBADA_TOKENS_PER_ROW,
             "layout": Layout(dp=8, micro_batch_size=16, bf16=True)}  # fmt: skip
    keep = {
        f.name: getattr(mates, f.name)
        for f in dataclasses.fields(mates)
        if f.name not in ("estimator", "influence")
    }
    keep["probe_samples"] = mates.probe_samples // 10 * 10
    out = {}
    for host in ("host", "no_host"):
        inf = dataclasses.replace(mates.influence, pass_token_ids=host == "no_host")
        base = project_mates_round(
            sel, dataclasses.replace(mates, estimator="linearized", influence=inf), **shape
        )
        out[f"mates_linearized_{host}"] = round(base.fraction, 4)
        for est in ("rollout", "linearized_rollout"):
            g = GroupMatesConfig(
                **keep, estimator=est, influence=dataclasses.replace(inf, model="relational")
            )
            for sharded in (False, True):
                c = project_group_mates_round(sel, g, sharded=sharded, **shape)
                key = f"group_mates_{est}_{'sharded' if sharded else 'today'}_{host}"
                out[key] = {"fraction": round(c.fraction, 4), "x_mates": round(c.selection_seconds / base.selection_seconds, 2),
                            "dominant": ".".join(c.dominant()),
                            "phases": {k: round(v / c.training_seconds, 4) for k, v in c.phase_seconds.items()}}  # fmt: skip
    return out

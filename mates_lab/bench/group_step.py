"""Group-MATES's set selection step (``selector: cluster_greedy``) measured beside its projection
(``mates_megatron.cost.group``), at growing round sizes, whole and in the selector's shards (``shard_size``), and
the paper round projected as built (one shard; shards spread over the ranks) and as designed (embeddings kept
from prediction, the k-means on the device).

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
            seed: int = 0, shard_size: int | None = None) -> dict:  # fmt: skip
    """One round of ``n`` candidates on one rank: k-means and greedy CPU seconds over every shard (the
    selector's ``shards``; one without ``shard_size``)."""
    from threadpoolctl import threadpool_limits

    from mates_megatron.selectors.group import ClusterGreedySelector, quotas, shards

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    scores = rng.standard_normal(n)
    k = int(round(ratio * n))
    sel = ClusterGreedySelector(cluster_size=cluster_size, kmeans_iters=iters, shard_size=shard_size)
    parts = shards(n, shard_size, seed=seed, round_=0)
    kmeans = greedy = 0.0
    clusters = 0
    with threadpool_limits(1):  # the selector's own steps, shard by shard
        for i, (part, k_part) in enumerate(
            zip(parts, quotas(np.array([len(p) for p in parts]), k), strict=True)
        ):
            t = _cpu()
            labels = sel.labels(emb[part], seed=seed, round_=0, shard=i if len(parts) > 1 else None)
            kmeans += _cpu() - t
            t = _cpu()
            clusters += sel.pick(scores[part], emb[part], labels, int(k_part))[1][0]
            greedy += _cpu() - t
    return {
        "candidates": n,
        "selected": k,
        "shard_size": shard_size,
        "clusters": clusters,
        "kmeans_seconds": kmeans,
        "greedy_seconds": greedy,
    }


def bench_group_step(
    sizes: tuple[int, ...] = (12000, 24000, 48000), *, dim: int = 384, shard_size: int = 12000
) -> dict:
    """Each size measured beside its projection (the ratio measured / projected per part), whole and in
    shards of ``shard_size`` (on one rank), and the paper_1b round projected."""
    from mates_megatron.cost import MACHINES
    from mates_megatron.cost.group import group_parts
    from mates_megatron.selectors.group import ClusterGreedyConfig

    machine, cfg = MACHINES["cpu-2core"], ClusterGreedyConfig()
    rows = []
    for n in sizes:
        for shard in (None, shard_size) if n > shard_size else (None,):
            m = measure(n, dim=dim, cluster_size=cfg.cluster_size, iters=cfg.kmeans_iters, shard_size=shard)
            p = group_parts(n, m["selected"], dim=dim, cluster_size=cfg.cluster_size,
                            kmeans_iters=cfg.kmeans_iters, machine=machine, shard_size=shard)  # fmt: skip
            row = {**m, "kmeans_projected": p["kmeans"], "greedy_projected": p["greedy"],
                   "kmeans_ratio": m["kmeans_seconds"] / p["kmeans"], "greedy_ratio": m["greedy_seconds"] / p["greedy"]}  # fmt: skip
            rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
            print(f"group step, {n:,} candidates{f' in shards of {shard:,}' if shard else ''}: k-means "
                  f"{m['kmeans_seconds']:.2f} s (projected {p['kmeans']:.2f}), greedy {m['greedy_seconds']:.2f} s "
                  f"(projected {p['greedy']:.2f})")  # fmt: skip
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

    raw = load_yaml(CONFIGS / "paper_1b.yaml")["selection"]
    sel = build(SelectionConfig, raw, where="paper_1b")
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
            # as built: one shard, then shards of each size spread over the world; and the design
            variants = [("today", None, False), *((f"shards{n}", n, False) for n in PAPER_SHARD_SIZES),
                        ("sharded", None, True)]  # fmt: skip
            for name, shard, sharded in variants:
                s_cfg = (
                    sel
                    if shard is None
                    else build(SelectionConfig, {**raw, **group_selection(raw, shard)}, where="paper_1b")
                )
                c = project_group_mates_round(s_cfg, g, sharded=sharded, **shape)
                out[f"group_mates_{est}_{name}_{host}"] = {
                    "fraction": round(c.fraction, 4), "x_mates": round(c.selection_seconds / base.selection_seconds, 2),
                    "dominant": ".".join(c.dominant()),
                    "phases": {k: round(v / c.training_seconds, 4) for k, v in c.phase_seconds.items()}}  # fmt: skip
        # Stacked as the paper runs it: the round first halved by the classifier, scored on the training ranks
        # every round or read from values computed once (`mates-megatron value --method classifier`).
        g = GroupMatesConfig(**keep, estimator="linearized_rollout",
                             influence=dataclasses.replace(inf, model="relational"))  # fmt: skip
        for name, stage in (("classifier", {"kind": "classifier", "keep": 0.5}),
                            ("values", {"kind": "values", "path": "pool/values/classifier.npy", "keep": 0.5})):  # fmt: skip
            stacked = {**raw, **group_selection(raw, PAPER_SHARD_SIZES[0]), "filters": [stage]}
            c = project_group_mates_round(build(SelectionConfig, stacked, where="paper_1b"), g, **shape)
            out[f"stacked_{name}_group_mates_linearized_rollout_shards{PAPER_SHARD_SIZES[0]}_{host}"] = {
                "fraction": round(c.fraction, 4), "x_mates": round(c.selection_seconds / base.selection_seconds, 2),
                "dominant": ".".join(c.dominant()),
                "phases": {k: round(v / c.training_seconds, 4) for k, v in c.phase_seconds.items()}}  # fmt: skip
    return out


PAPER_SHARD_SIZES = (30000, 100000)
"""Shard sizes the paper round is projected at (``ClusterGreedyConfig.shard_size``): 10 and 33 clusters a shard."""


def group_selection(raw: dict, shard_size: int) -> dict:
    """paper_1b's selection section with Group-MATES's scorer and selector (only the selector's options are
    read: the scorer's are passed to the projection)."""
    scorer = {**raw["scorer"], "kind": "group_mates", "estimator": "linearized_rollout",
              "influence": {**raw["scorer"]["influence"], "model": "relational"}}  # fmt: skip
    return {"scorer": scorer, "selector": {"kind": "cluster_greedy", "shard_size": shard_size}}

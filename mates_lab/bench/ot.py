"""`mates-lab bench ot`: LAVA's and GOT-D's effects at toy scale on the embedded data, and the scale of
the streamed Sinkhorn.

- ``lava_flip_recall_at_10pct``: a 5-class text task, label = the document's domain: a class-balanced
  training set of ``per_class`` pool documents per domain and a disjoint balanced trusted validation set of
  ``val_per_class``; 10% of the training labels flipped to another class (seeded); labelled LAVA values;
  the share of flipped points among the 10% highest values. Beside it on the same rows
  (``lava_flip_recall_peer_emd``, ``lava_flip_recall_knn_disagreement``): exact OT by POT at the same label
  weight, and the share of each row's 10 nearest neighbours that disagree with its label.
- ``lava_junk_auc``: feature-only LAVA values of the pool's documents against a clean reference, a seeded
  sample of the pool's non-junk documents (as many as the probe reference has; left out of the valued rows);
  the ROC AUC of the junk domain (positive = higher value). The probe reference (python_docs) is no clean
  reference for the junk question: licenses and package docs are as far from it as junk is.
  ``lava_junk_auc_probe_reference``: the same against the probe reference (the figure before).
- GOT-D continued training: a model pretrained on the random mix (the demo config, random selection,
  ``base_iters`` steps) is trained on for ``continue_iters`` steps, every arm from the same weights with the
  same steps, learning rate (the config's min_lr, constant) and seed. The continuation is two rounds: round
  0 is the hook's random draw (the same for every arm: the hook publishes it before the first step), round
  1 is chosen by the arm (top-k of values precomputed beside the shards for ``gotd`` and ``lookalike``; the
  ``dsir`` scorer with importance resampling; ``random``). Figures: the smoothed final held-out
  python_docs loss of each (``*_heldout``).
- ``sinkhorn_1m_seconds`` / ``sinkhorn_1m_peak_rss_gb``: valuing 1M candidates (384-d, a 64-cluster mixture
  on the unit sphere) against 1,024 reference points, in a fresh process (its peak RSS is the solve's).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml


def _embed_pool(data: Path, out: Path, max_length: int) -> tuple[np.ndarray, np.ndarray, list[str], Any]:
    """Embeddings of every pool document and of the reference (cached in ``out``), the domain ids/names."""
    from mates_megatron.encoder import Encoder, EncoderConfig
    from mates_megatron.pool.base import candidate_inputs
    from mates_megatron.pool.webdataset_pool import WebDatasetPool

    pool = WebDatasetPool(data / "train-shards", seq_length=1)
    cache = out / f"embeddings_{max_length}.npz"
    if cache.is_file() and str(np.load(cache)["fingerprint"]) == pool.fingerprint():
        z = np.load(cache)
        return z["pool"], z["reference"], list(pool.domains), pool
    emb = Encoder(EncoderConfig(max_length=max_length, batch_size=32))
    t = time.perf_counter()
    ids = np.arange(len(pool))
    x = emb.embed(candidate_inputs(pool, ids, token_ids=False))
    y = emb.embed_reference(data / "reference.jsonl", scorer="bench")
    print(f"[bench ot] embedded {len(x)} pool documents in {time.perf_counter() - t:.0f}s", flush=True)
    np.savez(cache, pool=x, reference=y, fingerprint=pool.fingerprint())
    return x, y, list(pool.domains), pool


def lava_flip_recall(x, domains, *, per_class: int, val_per_class: int, seed: int) -> dict[str, Any]:
    from mates_lab.bench.lava_digits import knn_disagreement, peer_lava_values, recall_at
    from mates_megatron.ot import SinkhornConfig
    from mates_megatron.ot.valuation import lava_values
    from mates_megatron.scorers.lava import LavaConfig

    rng = np.random.default_rng(seed)
    train, val = [], []
    for k in np.unique(domains):
        rows = rng.permutation(np.flatnonzero(domains == k))
        if len(rows) < per_class + val_per_class:
            raise ValueError(
                f"domain {k} has {len(rows)} documents, the task needs {per_class + val_per_class}"
            )
        train += list(rows[:per_class])
        val += list(rows[per_class : per_class + val_per_class])
    train, val = np.array(train), np.array(val)
    labels = domains[train].astype(np.int64)
    flipped = rng.choice(len(train), size=len(train) // 10, replace=False)
    classes = len(np.unique(domains))
    labels[flipped] = (labels[flipped] + rng.integers(1, classes, len(flipped))) % classes
    c = LavaConfig()
    cfg = SinkhornConfig(epsilon=c.epsilon, cost_scale=0.5, seed=seed)
    val_labels = domains[val].astype(np.int64)
    values, res, w = lava_values(
        x[train], x[val], cfg, x_labels=labels, y_labels=val_labels,
        label_weight=c.label_weight, label_epsilon=c.label_epsilon,
    )  # fmt: skip
    # Beside it, on the same rows: the exact-OT peer (POT) and a kNN label-disagreement baseline, as
    # `bench lava-digits` has them: they tell the method from the embedding's own limit.
    peer = peer_lava_values(x[train], labels, x[val], val_labels, c.label_weight)
    knn = knn_disagreement(x[train], labels, x[val], val_labels)
    return {
        "recall": recall_at(values, flipped),
        "peer_emd_recall": recall_at(peer, flipped),
        "knn_disagreement_recall": recall_at(knn, flipped),
        "train": len(train),
        "val": len(val),
        "converged": res.converged,
        "label_distance_diagonal_is_row_min": float(np.mean(np.argmin(w, 1) == np.arange(len(w)))),
    }


def lava_junk_auc(x, domains, junk: int, *, reference_size: int, seed: int) -> dict[str, Any]:
    """Feature-only LAVA of the pool against a clean reference drawn from its own non-junk documents (seeded,
    ``reference_size`` of them, not valued); the junk domain's ROC AUC over the other documents."""
    from sklearn.metrics import roc_auc_score

    from mates_megatron.ot import SinkhornConfig
    from mates_megatron.ot.valuation import lava_values
    from mates_megatron.scorers.lava import LavaConfig

    clean = np.flatnonzero(domains != junk)
    if reference_size >= len(clean):
        raise ValueError(
            f"reference_size={reference_size} leaves none of the {len(clean)} non-junk documents to value: lower it"
        )
    rng = np.random.default_rng([seed, 0x1C7])
    ref = np.sort(rng.choice(clean, size=reference_size, replace=False))
    valued = np.setdiff1d(np.arange(len(x)), ref)
    cfg = SinkhornConfig(epsilon=LavaConfig().epsilon, cost_scale=0.5, seed=seed)
    values, res, _ = lava_values(x[valued], x[ref], cfg)
    return {
        "auc": float(roc_auc_score(domains[valued] == junk, values)),
        "reference_rows": ref.tolist(),
        "converged": res.converged,
    }


def _continue_runs(
    data: Path,
    config: Path,
    out: Path,
    values: dict[str, np.ndarray],
    *,
    fingerprint: str,
    base_iters: int,
    iters: int,
    seed: int,
) -> dict[str, Any]:
    """Pretrain on the random mix, then continue each arm from those weights; held-out losses."""
    from mates_lab.demo import smooth
    from mates_megatron.launch import run_config
    from mates_megatron.ot.values_file import write_values
    from mates_megatron.pretrain import launch_checked

    base_cfg = yaml.safe_load(config.read_text())
    base_cfg = {**base_cfg, "seed": seed, "train_iters": base_iters, "eval_interval": 20}
    sel = base_cfg["selection"]
    base_dir = out / f"base_seed{seed}"
    # The base run's checkpoint is what the arms continue from: kept (its own directory holds config and metrics).
    run_config({**base_cfg, "save": str(base_dir / "ckpt"),
                "selection": {**sel, "selector": "random", "scorer": "none", "scorer_options": {}, "seed": seed}},
               base_dir, runner=launch_checked)  # fmt: skip
    for name, v in values.items():
        write_values(
            data / "train-shards", f"bench_{name}", v, {"method": name, "pool_fingerprint": fingerprint}
        )
    # Two rounds: the first is the hook's random draw (every arm alike), the second the arm's.
    common = {
        "pool": {"kind": "webdataset", "shards": str(data / "train-shards")}, "select_every": iters // 2,
        "warmup_steps": 0, "seed": seed,
    }  # fmt: skip
    arms = {
        "gotd": {"selector": "topk", "scorer": "values",
                 "scorer_options": {"path": str(data / "train-shards/values/bench_gotd.npy")}},
        "lookalike": {"selector": "topk", "scorer": "values",
                      "scorer_options": {"path": str(data / "train-shards/values/bench_lookalike.npy")}},
        "dsir": {"selector": "importance", "scorer": "dsir", "scorer_options": {}},
        "random": {"selector": "random", "scorer": "none", "scorer_options": {}},
    }  # fmt: skip
    result = {}
    for name, arm in arms.items():
        cfg = {
            **base_cfg, "train_iters": iters, "lr_warmup_iters": 0, "lr_decay_style": "constant",
            "lr": base_cfg.get("min_lr", 2e-4), "min_lr": base_cfg.get("min_lr", 2e-4), "eval_interval": 5,
            "pretrained_checkpoint": str(base_dir / "ckpt"), "selection": {**sel, **common, **arm},
        }  # fmt: skip
        run = run_config(cfg, out / f"{name}_seed{seed}", runner=launch_checked)
        held = run["eval"]["heldout/python_docs"]
        result[name] = {
            "heldout": smooth(held)[-1],
            "heldout_start": held[0],
            "share_by_domain": (run.get("selection") or {}).get("selected_share_by_domain"),
        }
    return result


SCALE_SCRIPT = """
import json, resource, sys, time
import numpy as np, torch
from mates_megatron.ot import SinkhornConfig, sinkhorn
n, m, d, max_iter = (int(a) for a in sys.argv[1:5])
rng = np.random.default_rng(0)
centres = rng.normal(size=(64, d)).astype(np.float32)
def cloud(k, seed):
    r, x = np.random.default_rng(seed), np.empty((k, d), np.float32)
    for lo in range(0, k, 65536):  # in chunks: the peak RSS is the solve's, not the generator's
        c = centres[r.integers(0, 64, min(65536, k - lo))]
        c += 0.5 * r.standard_normal(size=c.shape, dtype=np.float32)
        x[lo : lo + len(c)] = c / np.linalg.norm(c, axis=1, keepdims=True)
    return x
x, y = cloud(n, 1), cloud(m, 2)
t = time.perf_counter()
res = sinkhorn(x, y, SinkhornConfig(epsilon=0.1, momentum=1.3, max_iter=max_iter, progress=True))
v = res.calibrated
print(json.dumps({"seconds": time.perf_counter() - t, "iterations": res.iterations,
    "marginal_error": res.marginal_error, "converged": res.converged,
    "seconds_per_pass": res.seconds / res.iterations,
    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "input_gb": (x.nbytes + y.nbytes) / 2**30, "threads": torch.get_num_threads()}))
"""


def bench_sinkhorn_scale(n: int, m: int = 1024, d: int = 384, max_iter: int = 1000) -> dict[str, Any]:
    """One solve in a fresh process; ``max_iter`` caps the full passes (the figures then say so:
    ``converged`` false, ``seconds_per_pass`` for a projection)."""
    out = subprocess.run(
        [sys.executable, "-c", SCALE_SCRIPT, str(n), str(m), str(d), str(max_iter)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_ot(
    data: Path, config: Path, out: Path, *, seed: int = 0, max_length: int = 128, scale: int = 1_000_000,
    base_iters: int = 160, continue_iters: int = 40, skip_training: bool = False, scale_max_iter: int = 1000,
) -> dict[str, Any]:  # fmt: skip
    from sklearn.metrics import roc_auc_score

    from mates_megatron.ot import SinkhornConfig
    from mates_megatron.ot.valuation import gotd_values, lava_values
    from mates_megatron.scorers.gotd import GotdConfig
    from mates_megatron.scorers.lava import LavaConfig
    from mates_megatron.scorers.lookalike import lookalike_scores

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    x, y, names, pool = _embed_pool(data, out, max_length)
    domains = pool.domain_ids(np.arange(len(pool))).astype(np.int64)
    flip = lava_flip_recall(x, domains, per_class=150, val_per_class=50, seed=seed)
    lava, _, _ = lava_values(x, y, SinkhornConfig(epsilon=LavaConfig().epsilon, cost_scale=0.5, seed=seed))
    junk = domains == names.index("junk")
    clean_ref = lava_junk_auc(x, domains, names.index("junk"), reference_size=len(y), seed=seed)
    g = GotdConfig()
    gotd, _ = gotd_values(x, y, SinkhornConfig(epsilon=g.epsilon, momentum=g.momentum, seed=seed))
    lookalike = lookalike_scores(x, y, k=10)  # the 'lookalike' scorer's own computation
    k = len(x) // 5

    def share(v):
        top = domains[np.argsort(v, kind="stable")[:k]]
        return {names[d]: float(np.mean(top == d)) for d in range(len(names))}

    result: dict[str, Any] = {
        "lava_flip_recall_at_10pct": flip["recall"],
        "lava_flip_recall_peer_emd": flip["peer_emd_recall"],
        "lava_flip_recall_knn_disagreement": flip["knn_disagreement_recall"],
        "lava_flip_task": flip,
        "lava_junk_auc": clean_ref["auc"],
        "lava_junk_auc_probe_reference": float(roc_auc_score(junk, lava)),
        "lava_junk_clean_reference": {
            "size": len(clean_ref["reference_rows"]),
            "converged": clean_ref["converged"],
        },
        "top20pct_share_by_domain": {"gotd": share(gotd), "lookalike": share(lookalike), "lava": share(lava)},
        "embedding_max_length": max_length,
    }
    print(json.dumps(result, indent=1), flush=True)
    if not skip_training:
        runs = _continue_runs(
            data, config, out, {"gotd": gotd, "lookalike": lookalike},
            fingerprint=pool.fingerprint(), base_iters=base_iters, iters=continue_iters, seed=seed,
        )  # fmt: skip
        result.update({f"{name}_heldout": r["heldout"] for name, r in runs.items()})
        result["continued_training"] = {**runs, "base_iters": base_iters, "continue_iters": continue_iters}
    if scale:
        s = bench_sinkhorn_scale(scale, max_iter=scale_max_iter)
        result.update({"sinkhorn_1m_seconds": s["seconds"], "sinkhorn_1m_peak_rss_gb": s["peak_rss_gb"],
                       "sinkhorn_1m": {**s, "candidates": scale, "reference": 1024, "dim": 384}})  # fmt: skip
    result["wall_seconds"] = time.perf_counter() - t0
    return result

"""`mates-lab bench lava-digits`: LAVA's label-flip experiment (Just et al., ICLR 2023) at small scale, on
scikit-learn's ``load_digits`` (1,797 8x8 images, 10 classes), beside an exact-OT peer and simple baselines.

Per seed: ``per_class`` rows of every class are valued, ``trusted_per_class`` more are the trusted validation
set, and the rest (neither valued nor trusted, clean) fit the embedder, scikit-learn's
``LinearDiscriminantAnalysis`` (9 dimensions). Features are its transform, L2-normalised as the project's
embeddings are (``ot.valuation``: the absolute epsilons then mean the same as in the scorer). ``flip_rate`` of
the valued rows get a uniformly drawn different label. Figure: recall@10%, the share of the flipped rows
among the 10% of valued rows valued most harmful, for

- ``lava_lambda1`` / ``lava_lambda3``: the project's ``lava_values`` with the 'lava' scorer's options
  (``LavaConfig``) at label weight 1 (the default, the authors') and 3 (the old default);
- ``lava_lambda3_reweighted``: weight 3 with the valued rows' masses set to the trusted class shares;
- ``peer_emd_lambda1`` / ``peer_emd_lambda3``: an independent implementation with POT: exact OT (``ot.emd``)
  on the cost ``||x - x'||^2 / 2 + λ W(y, y')``, where ``W`` is the exact OT value (``ot.emd2``, the same
  half squared distance) between the valued class y's and the trusted class y''s points, and the authors'
  calibrated gradient of the valued side's dual potential (``(1 + 1/(N-1)) f_i - sum f / (N-1)``, LAVA's
  ``values``). The project's label distance is the debiased Sinkhorn divergence at ``label_epsilon``; the exact
  value is what it approximates;
- ``knn_disagreement``: the share of a row's ``k`` nearest neighbours (trusted and valued rows, itself left
  out; the same features) whose label differs from its own;
- ``random``: a seeded random order (0.1 expected).

Each figure per seed, and its mean with a 95% t-interval over the seeds.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from mates_lab.bench.intervals import mean_ci

METHODS = (
    "lava_lambda1",
    "lava_lambda3",
    "lava_lambda3_reweighted",
    "peer_emd_lambda1",
    "peer_emd_lambda3",
    "knn_disagreement",
    "random",
)


def split(
    labels: np.ndarray, *, per_class: int, trusted_per_class: int, flip_rate: float, seed: int
) -> dict[str, np.ndarray]:
    """Row indices of the valued, trusted and embedder-fit sets (disjoint, per class), the valued rows' noisy
    labels and which valued positions were flipped (each to a uniformly drawn different class)."""
    rng = np.random.default_rng([seed, 0x1A7A])
    classes = np.unique(labels)
    valued, trusted, fit = [], [], []
    for k in classes:
        rows = rng.permutation(np.flatnonzero(labels == k))
        if len(rows) < per_class + trusted_per_class + 1:
            raise ValueError(
                f"class {k} has {len(rows)} rows; per_class={per_class} + trusted_per_class="
                f"{trusted_per_class} leave none to fit the embedder on: lower them"
            )
        valued += list(rows[:per_class])
        trusted += list(rows[per_class : per_class + trusted_per_class])
        fit += list(rows[per_class + trusted_per_class :])
    valued, trusted, fit = np.array(valued), np.array(trusted), np.array(fit)
    noisy = labels[valued].astype(np.int64)
    flipped = np.sort(rng.choice(len(valued), size=int(round(flip_rate * len(valued))), replace=False))
    shift = rng.integers(1, len(classes), len(flipped))
    noisy[flipped] = classes[(np.searchsorted(classes, noisy[flipped]) + shift) % len(classes)]
    return {"valued": valued, "trusted": trusted, "fit": fit, "noisy": noisy, "flipped": flipped}


def recall_at(values: np.ndarray, flipped: np.ndarray, share: float = 0.1) -> float:
    """The share of ``flipped`` among the ``share`` of rows with the highest values (most harmful)."""
    top = np.argsort(-values, kind="stable")[: int(math.ceil(share * len(values)))]
    return len(np.intersect1d(top, flipped)) / len(flipped)


def peer_lava_values(
    x: np.ndarray, x_labels: np.ndarray, y: np.ndarray, y_labels: np.ndarray, label_weight: float
) -> np.ndarray:
    """LAVA values by exact OT with POT (see the module docstring); higher = more harmful."""
    try:
        import ot
    except ImportError:
        raise ImportError(
            "the peer of `mates-lab bench lava-digits` is POT: `pip install pot` (or the `test` extra)"
        ) from None
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    half_sq = 0.5 * ot.dist(x, y, metric="sqeuclidean")
    kx, ky = np.unique(x_labels), np.unique(y_labels)
    w = np.zeros((int(kx.max()) + 1, int(ky.max()) + 1))
    for k in kx:
        for m in ky:
            c = half_sq[np.ix_(x_labels == k, y_labels == m)]
            w[k, m] = ot.emd2(np.full(c.shape[0], 1 / c.shape[0]), np.full(c.shape[1], 1 / c.shape[1]), c)
    cost = half_sq + label_weight * w[x_labels][:, y_labels]
    n, m = cost.shape
    _, log = ot.emd(np.full(n, 1 / n), np.full(m, 1 / m), cost, log=True)
    f = np.asarray(log["u"], dtype=np.float64)
    return (1 + 1 / (n - 1)) * f - f.sum() / (n - 1)  # LAVA's `values` (ruoxi-jia-group/LAVA, lava.py)


def knn_disagreement(
    x: np.ndarray, x_labels: np.ndarray, y: np.ndarray, y_labels: np.ndarray, k: int = 10
) -> np.ndarray:
    """Per valued row, the share of its ``k`` nearest rows among the valued (``x``, itself left out) and
    trusted (``y``) ones whose label differs from its own."""
    from sklearn.neighbors import NearestNeighbors

    pool = np.concatenate([x, y])
    pool_labels = np.concatenate([x_labels, y_labels])
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(pool).kneighbors(x)
    out = np.empty(len(x))
    for i, row in enumerate(idx):
        row = row[row != i][:k]  # itself (position i in the pool) left out
        out[i] = np.mean(pool_labels[row] != x_labels[i])
    return out


def one_seed(
    seed: int, *, per_class: int, trusted_per_class: int, flip_rate: float, k: int
) -> dict[str, Any]:
    from scipy import stats
    from sklearn.datasets import load_digits
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from mates_megatron.ot.valuation import lava_values
    from mates_megatron.scorers.lava import LavaConfig

    images, labels = load_digits(return_X_y=True)
    s = split(
        labels, per_class=per_class, trusted_per_class=trusted_per_class, flip_rate=flip_rate, seed=seed
    )
    lda = LinearDiscriminantAnalysis().fit(images[s["fit"]], labels[s["fit"]])

    def embed(rows: np.ndarray) -> np.ndarray:
        z = lda.transform(images[rows]).astype(np.float32)
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    x, y = embed(s["valued"]), embed(s["trusted"])
    xl, yl = s["noisy"], labels[s["trusted"]].astype(np.int64)
    c = LavaConfig(labelled=True)
    values, converged, seconds = {}, {}, {}
    for name, weight, reweight in (
        ("lava_lambda1", 1.0, False),
        ("lava_lambda3", 3.0, False),
        ("lava_lambda3_reweighted", 3.0, True),
    ):
        t = time.perf_counter()
        v, res, _ = lava_values(
            x, y, c.sinkhorn(seed, cost_scale=0.5), x_labels=xl, y_labels=yl, label_weight=weight,
            label_epsilon=c.label_epsilon, max_per_class=c.max_per_class, reweight_to_reference_classes=reweight,
        )  # fmt: skip
        values[name], converged[name], seconds[name] = v, bool(res.converged), time.perf_counter() - t
    for name, weight in (("peer_emd_lambda1", 1.0), ("peer_emd_lambda3", 3.0)):
        t = time.perf_counter()
        values[name], seconds[name] = peer_lava_values(x, xl, y, yl, weight), time.perf_counter() - t
    values["knn_disagreement"] = knn_disagreement(x, xl, y, yl, k)
    values["random"] = np.random.default_rng([seed, 0x5A7D]).random(len(x))
    rho = {
        f"lambda{w}": float(
            stats.spearmanr(values[f"lava_lambda{w}"], values[f"peer_emd_lambda{w}"]).statistic
        )
        for w in (1, 3)
    }
    return {
        "seed": seed,
        "recall_at_10pct": {m: recall_at(values[m], s["flipped"]) for m in METHODS},
        "sinkhorn_converged": converged,
        "seconds": {m: round(t, 2) for m, t in seconds.items()},
        "spearman_project_vs_peer": rho,
        "lda_accuracy_on_trusted": float(np.mean(lda.predict(images[s["trusted"]]) == labels[s["trusted"]])),
        "rows": {"valued": len(x), "trusted": len(y), "fit": len(s["fit"]), "flipped": len(s["flipped"])},
    }


def bench_lava_digits(
    seeds: list[int],
    *,
    per_class: int = 100,
    trusted_per_class: int = 30,
    flip_rate: float = 0.1,
    k: int = 10,
) -> dict[str, Any]:
    """Every seed's figures and, per method, the mean recall@10% with its 95% t-interval over the seeds."""
    if not 0 < flip_rate < 1:
        raise ValueError(f"flip_rate={flip_rate} must be in (0, 1) (the paper's experiment: 0.1)")
    from mates_lab.acquisition.strategies import one_thread

    runs = []
    for seed in seeds:
        with one_thread():  # small transports: on 2 busy cores a second thread made them ~10x slower
            r = one_seed(
                seed, per_class=per_class, trusted_per_class=trusted_per_class, flip_rate=flip_rate, k=k
            )
        print(f"[bench lava-digits] seed {seed}: {r['recall_at_10pct']}", flush=True)
        runs.append(r)
    per_method = {m: [r["recall_at_10pct"][m] for r in runs] for m in METHODS}
    return {
        "setup": {
            "dataset": "sklearn load_digits",
            "per_class": per_class,
            "trusted_per_class": trusted_per_class,
            "flip_rate": flip_rate,
            "knn_k": k,
            "embedder": "LinearDiscriminantAnalysis on the other rows, L2-normalised",
            "seeds": list(seeds),
        },  # fmt: skip
        "recall_at_10pct": {m: mean_ci(v) for m, v in per_method.items()},
        "runs": runs,
    }

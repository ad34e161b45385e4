"""Data values from the OT component: LAVA (labelled or feature-only), GOT-D, and GOT-D's domain screening.

Inputs are embeddings (``embed_texts``: the influence encoder's mean-pooled states, L2-normalised so the
squared distances lie in [0, 4] whatever the encoder's scale and the absolute epsilons mean the same thing).

- LAVA: candidates against a trusted reference; value = calibrated candidate potential, higher = more
  harmful. Labelled: the cost adds ``label_weight`` times the distance between the candidate's class and the
  reference point's class, each class distance the Sinkhorn divergence between the two classes' feature
  clouds (OTDD's label distance, which LAVA uses). ``reweight_to_reference_classes`` gives each candidate
  class the reference's share of the mass (spread evenly within the class), so that label flips that change
  the class counts do not make balanced OT ship the surplus across labels.
- GOT-D: candidates against the target; value = calibrated candidate potential, the most negative first
  (the data that moves the candidate distribution toward the target most).
- Domain screening (GOT-D, before the selection): each domain's entropic OT value to the target on a seeded
  sample of its candidates; the closest domains are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from mates_megatron.ot.sinkhorn import OTResult, SinkhornConfig, sinkhorn
from mates_megatron.progress import progress as progress_bar


def embed_texts(
    net,
    texts: Sequence,
    *,
    batch_size: int = 32,
    normalize: bool = True,
    progress: bool = False,
    loader_workers: int = 0,
) -> np.ndarray:
    """float32 [len(texts), hidden] embeddings from an ``EncoderRegressor`` (its ``cfg.ridge.features``),
    L2-normalised rows when ``normalize``. ``loader_workers`` > 0: the texts are read and tokenised in that
    many loader processes ahead of the encoder (the same batches, the same values)."""
    from mates_megatron.influence.loader import spans
    from mates_megatron.influence.ridge import streamed_features

    net.eval()
    out = np.empty((len(texts), net.encoder.config.hidden_size), dtype=np.float32)
    parts = spans(0, len(texts), batch_size)
    feats = streamed_features(net, texts, parts, workers=loader_workers)  # 0: read in this process
    for part, x in progress_bar(
        zip(parts, feats, strict=True), total=len(parts), desc="embed", leave=False, disable=not progress
    ):  # fmt: skip
        out[part.start : part.stop] = x
    return normalize_rows(out) if normalize else out


def normalize_rows(out: np.ndarray) -> np.ndarray:
    """``out`` with each row divided by its L2 norm, in place (ValueError for an all-zero row)."""
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("an embedding is all zeros: it cannot be normalised (an empty text?)")
    out /= norms
    return out


def _class_sample(x: np.ndarray, labels: np.ndarray, k: int, cap: int, rng) -> np.ndarray:
    rows = np.flatnonzero(labels == k)
    if len(rows) > cap:
        rows = np.sort(rng.choice(rows, size=cap, replace=False))
    return x[rows]


def label_distances(
    x: np.ndarray,
    x_labels: np.ndarray,
    y: np.ndarray,
    y_labels: np.ndarray,
    cfg: SinkhornConfig,
    *,
    max_per_class: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """[K, L] Sinkhorn divergences between candidate class k's and reference class l's feature clouds
    (K, L = max label + 1; an absent class gets a row/column of zeros and is never used). A class larger
    than ``max_per_class`` is represented by a seeded sample of that size (the outer transport uses every
    point)."""
    rng = np.random.default_rng([seed, 0x1AB])
    small = replace(cfg, warm_start=0, progress=False)
    kx, ky = int(x_labels.max()) + 1, int(y_labels.max()) + 1
    xs = {k: _class_sample(x, x_labels, k, max_per_class, rng) for k in range(kx)}
    ys = {k: _class_sample(y, y_labels, k, max_per_class, rng) for k in range(ky)}
    self_x = {k: sinkhorn(v, v, small).value for k, v in xs.items() if len(v)}
    self_y = {k: sinkhorn(v, v, small).value for k, v in ys.items() if len(v)}
    out = np.zeros((kx, ky))
    for k, xv in xs.items():
        for m, yv in ys.items():
            if len(xv) and len(yv):
                out[k, m] = sinkhorn(xv, yv, small).value - 0.5 * (self_x[k] + self_y[m])
    return np.maximum(out, 0.0)  # a divergence is >= 0; tiny negatives are solver tolerance


def lava_values(
    x: np.ndarray,
    y: np.ndarray,
    cfg: SinkhornConfig,
    *,
    x_labels: np.ndarray | None = None,
    y_labels: np.ndarray | None = None,
    label_weight: float = 1.0,
    label_epsilon: float | None = None,
    max_per_class: int = 1000,
    reweight_to_reference_classes: bool = False,
) -> tuple[np.ndarray, OTResult, np.ndarray | None]:
    """LAVA values of candidates ``x`` against the reference ``y`` (higher = more harmful), the OT solution,
    and the label distances (None when feature-only), those computed at ``label_epsilon`` (None: the
    transport's epsilon).

    ``label_weight`` 1 is the authors' (OTDD's ``DatasetDistance(λ_x=1, λ_y=1)`` in ruoxi-jia-group/LAVA).
    ``reweight_to_reference_classes`` (labelled mode): the candidates' masses follow the reference's class
    shares (``class_reweighted_masses``) instead of being uniform; the calibrated gradient is unchanged."""
    if (x_labels is None) != (y_labels is None):
        raise ValueError("LAVA's labelled mode needs labels for both the candidates and the reference")
    if x_labels is None:
        if reweight_to_reference_classes:
            raise ValueError(
                "reweight_to_reference_classes needs labels (x_labels, y_labels): without them there are no "
                "classes to reweight; pass the labels or leave it False"
            )
        res = sinkhorn(x, y, cfg)
        return res.calibrated, res, None
    x_labels, y_labels = np.asarray(x_labels), np.asarray(y_labels)
    a = class_reweighted_masses(x_labels, y_labels) if reweight_to_reference_classes else None
    label_cfg = cfg if label_epsilon is None else replace(cfg, epsilon=label_epsilon)
    w = label_distances(x, x_labels, y, y_labels, label_cfg, max_per_class=max_per_class, seed=cfg.seed)
    res = sinkhorn(x, y, cfg, a=a, label_cost=label_weight * w, x_labels=x_labels, y_labels=y_labels)
    return res.calibrated, res, w


def class_reweighted_masses(x_labels: np.ndarray, y_labels: np.ndarray) -> np.ndarray:
    """Candidate masses [N] summing to one: class k's total is its share of the reference labels, spread
    evenly over the candidates labelled k. With these, a balanced transport need not move mass between
    labels when the candidates' class counts differ from the reference's (label flips change them)."""
    x_labels, y_labels = np.asarray(x_labels), np.asarray(y_labels)
    classes, counts = np.unique(x_labels, return_counts=True)
    ref = {int(k): n for k, n in zip(*np.unique(y_labels, return_counts=True), strict=True)}
    missing = [int(k) for k in classes if int(k) not in ref]
    if missing:
        raise ValueError(
            f"reweight_to_reference_classes: candidate classes {missing} have no reference rows, so their "
            "share (and mass) would be zero; add reference rows of those classes or leave it False"
        )
    share = {int(k): ref[int(k)] / n for k, n in zip(classes, counts, strict=True)}
    a = np.array([share[int(k)] for k in x_labels], dtype=np.float64)
    return a / a.sum()


def gotd_values(x: np.ndarray, y: np.ndarray, cfg: SinkhornConfig) -> tuple[np.ndarray, OTResult]:
    """GOT-D's calibrated potentials of candidates ``x`` toward the target ``y`` (select the lowest)."""
    res = sinkhorn(x, y, cfg)
    return res.calibrated, res


def screen_domains(
    x: np.ndarray,
    domains: np.ndarray,
    y: np.ndarray,
    cfg: SinkhornConfig,
    *,
    keep: int,
    samples_per_domain: int,
    seed: int = 0,
) -> tuple[list[int], dict[int, float]]:
    """GOT-D's domain screening: the ``keep`` domains whose candidates (a seeded sample of at most
    ``samples_per_domain`` each) are closest to the target in entropic OT value, and every domain's value."""
    if keep < 1:
        raise ValueError(f"screen_domains keep={keep} must be >= 1")
    rng = np.random.default_rng([seed, 0x5C4])
    small = replace(cfg, warm_start=0, progress=False)
    dist = {
        int(d): sinkhorn(_class_sample(x, domains, d, samples_per_domain, rng), y, small).value
        for d in np.unique(domains)
    }
    return sorted(dist, key=lambda d: (dist[d], d))[:keep], dist

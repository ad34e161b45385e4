"""`mates-lab bench ot`'s junk question: feature-only LAVA against a clean reference drawn from the pool's
own non-junk documents."""

import numpy as np
import pytest

from mates_lab.bench.ot import lava_junk_auc


def _sphere_clusters(rng, sizes, d=16, spread=0.3):
    centres = rng.normal(size=(len(sizes), d))
    x = np.concatenate([c + spread * rng.normal(size=(n, d)) for c, n in zip(centres, sizes, strict=True)])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.repeat(
        np.arange(len(sizes)), sizes
    )


def test_junk_is_valued_highest_against_a_clean_reference_of_the_pool():
    from mates_lab.acquisition.strategies import one_thread

    x, domains = _sphere_clusters(np.random.default_rng(0), [60, 60, 60, 40])  # domain 3 is the junk
    with one_thread():
        r = lava_junk_auc(x, domains, 3, reference_size=40, seed=0)
    ref = np.array(r["reference_rows"])
    assert len(ref) == 40 and not np.any(domains[ref] == 3) and r["converged"]
    assert r["auc"] >= 0.95  # the junk cluster is far from every clean one; 1.0 here
    with pytest.raises(ValueError, match="leaves none of the 180 non-junk documents"):
        lava_junk_auc(x, domains, 3, reference_size=180, seed=0)


def test_flip_recall_reports_the_peer_and_the_knn_baseline_on_the_same_rows():
    """Five separated clusters, labels = clusters: the project's LAVA, the exact-OT peer and the kNN baseline
    each find every flip (1.0 each, measured); the bench reports all three for the text task."""
    from mates_lab.acquisition.strategies import one_thread
    from mates_lab.bench.ot import lava_flip_recall

    x, domains = _sphere_clusters(np.random.default_rng(1), [80] * 5, spread=0.2)
    with one_thread():
        r = lava_flip_recall(x, domains, per_class=60, val_per_class=20, seed=0)
    assert (r["train"], r["val"]) == (300, 100) and r["converged"]
    assert min(r["recall"], r["peer_emd_recall"], r["knn_disagreement_recall"]) >= 0.9, r
    with pytest.raises(ValueError, match="domain 0 has 80 documents, the task needs 81"):
        lava_flip_recall(x, domains, per_class=61, val_per_class=20, seed=0)

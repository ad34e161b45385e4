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

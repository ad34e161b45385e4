"""`mates-lab bench projektor-digits`: Projektor's own experiment at small scale (issue 35, part 4).

    mates-lab bench projektor-digits --seeds 0 1 2 3 4 --out runs/projektor_digits.json

Projektor (Kang et al., NeurIPS 2023) fits, at two pilot sizes N0 < N1, performance against
``[OT(p), p, p * OT(p), p^2 * OT(p)]`` over a grid of mixtures ``p`` of the sources, projects to a larger
size N through ``L(N) linear in log N``, and picks the mixture by gradient steps on the projection. Its
experiments: a few sources, each alone insufficient (different class make-ups, one with noisy labels), pilots
trained to convergence, projection to a size never trained. The LM bench (``bench projektor``) fits 16
coefficients on 16 pilots in a warm-up regime; this is the paper's setting where a classifier converges.

Setup (chosen from the paper's description before any figure was seen; every seed re-draws the split):

- scikit-learn's ``load_digits`` (1,797 8x8 images, 10 classes of about 180).
- Per class, seeded: ``test_per_class`` = 30 rows to a balanced held-out test set (the reported errors;
  seen by no fit, no OT and no choice), ``val_per_class`` = 20 rows to a balanced validation set (the OT
  target and the pilots' performance, as in the paper, where both read the validation data).
- Three sources by class group, every source holding every class in different proportions: source i takes
  ``home_share`` = 70% of each class of its group (0-3, 4-6, 7-9) and 15% of every other class. Why not
  disjoint class groups: then any single source misses 6 or 7 of the 10 classes and the mixture question is
  only "cover every group", which the OT term answers without any scaling; with overlapping groups each
  source alone still under-covers 6-7 classes (the paper's "each source alone is insufficient") and the
  trade-off between coverage and the noisy source's rows is a real one.
- Label noise: ``noise`` = 30% of the rows of source 2 (the 7-9 source) get a uniformly drawn other label
  (the paper's noisy source). Labels in the test and validation sets are clean.
- Pilots: a regular grid on the 3-simplex of step ``1/grid`` (``grid`` = 7: 36 mixtures, 3.6x stage 1's
  10 coefficients), each at N0 = 45 and N1 = 90 rows; judged: ``judged`` = 10 seeded Dirichlet(1) mixtures
  (none on the grid), uniform and the three single sources, each at N0, N1 and N = 360 (4x N1: the source
  size bounds N, a source holds about 400 rows).
- A run: the mixture's rows by largest remainder of ``p * N``, drawn from each source without replacement
  (with replacement, as the DAM strategy's ``pilot_error`` draws from sellers' small samples, would repeat
  rows at N close to a source's size); a logistic regression (``mates_lab.acquisition.score.fit_predict``:
  lbfgs capped at 1,000 iterations, the DAM rule) on the raw pixels; clean sources converge in under 100
  iterations, fits with much of the noisy source at N reach the cap (checked on seed 0: run to convergence,
  1,200 to 3,900 iterations, their test error moves by at most 0.016, uniform's by 0.003); the error rate
  on the validation (pilots, projections) and test sets, averaged over ``draws`` = 5 seeded draws. The draws' randomness is
  shared across mixtures at one size (common random numbers: the comparisons between mixtures are paired).
- OT: as the DAM strategy's Projektor (``mates_lab.acquisition.strategies``): class-aware entropic OT on
  PCA(``pca_dims`` = 32) embeddings (fitted on the sources' rows) L2-normalised, LAVA's label distance
  weighted by ``LavaConfig().label_weight`` (1 since issue 35), epsilon 0.1, float64, between the p-mixture of ``revealed`` = 100 seeded rows
  per source (the partially revealed sources) and the validation set.
- Figures: (1) projection error at N on the 14 judged mixtures, mean absolute error against the actual
  validation error at N, of Projektor (stage 1 at both sizes + stage 2) and of a per-mixture power law
  ``a N^-b`` through that mixture's own errors at N0 and N1 (the paper's comparison; it needs pilots of every
  mixture it projects, Projektor does not); the MAE against the actual *test* error is reported beside it.
  (2) Projektor's chosen mixture (``choose_mixture`` at N, started from uniform and from the best projected
  pilot) trained at N, its test error against uniform's, the best single source's and the best judged
  mixture's (both best in hindsight, by test error: an oracle, not a method).

Reported per seed, and as a mean with a 95% t-interval over seeds; ``paired`` holds the chosen mixture's
error minus each comparison's per seed (the arms share the seed's split and draws).
What was measured is in ``docs/results/mixtures.md``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mates_lab.bench.intervals import mean_ci

_SPLIT_TAG, _NOISE_TAG, _DRAW_TAG, _JUDGED_TAG, _REVEAL_TAG = 0x9D1, 0x9D2, 0x9D3, 0x9D4, 0x9D5
GROUPS = ((0, 1, 2, 3), (4, 5, 6), (7, 8, 9))
"""The classes each source holds most of."""


@dataclass(frozen=True)
class ProjektorDigitsConfig:
    """The toy's setup (see the module docstring for why these values)."""

    test_per_class: int = 30
    """Rows per class of the balanced held-out test set (the reported errors)."""
    val_per_class: int = 20
    """Rows per class of the balanced validation set (OT target and the pilots' performance)."""
    home_share: float = 0.7
    """Share of each class that goes to the source of its group; the rest is split evenly over the others."""
    noise: float = 0.3
    """Share of the noisy source's rows whose label is replaced by another class."""
    noisy_source: int = 2
    """The source with flipped labels."""
    grid: int = 7
    """Pilot mixtures: the simplex grid of step 1/grid ((grid+1)(grid+2)/2 mixtures)."""
    judged: int = 10
    """Seeded Dirichlet(1) mixtures judged at N besides uniform and the single sources."""
    sizes: tuple[int, int, int] = (45, 90, 360)
    """N0 < N1 (pilots) and N (projected, trained only to judge)."""
    draws: int = 5
    """Seeded draws averaged per (mixture, size)."""
    revealed: int = 100
    """Rows per source the OT reads."""
    pca_dims: int = 32
    """Dimensions of the OT's embedding."""
    ridge: float = 1e-3
    """Stage 1's ridge."""
    choose_steps: int = 100
    """Gradient steps of ``choose_mixture`` from each start (its default)."""

    def __post_init__(self) -> None:
        n0, n1, n = self.sizes
        if not 0 < n0 < n1 < n:
            raise ValueError(f"ProjektorDigitsConfig.sizes={self.sizes}: use N0 < N1 < N, all positive")
        if self.grid < 3 or (self.grid + 1) * (self.grid + 2) // 2 < 30:
            raise ValueError(
                f"ProjektorDigitsConfig.grid={self.grid} gives fewer than 30 pilots (3x stage 1's 10 "
                "coefficients); use grid >= 7"
            )
        if not 1 / 3 <= self.home_share <= 1:
            raise ValueError(f"ProjektorDigitsConfig.home_share={self.home_share} must be in [1/3, 1]")
        if not 0 <= self.noise < 1 or self.noisy_source not in (0, 1, 2):
            raise ValueError("ProjektorDigitsConfig needs noise in [0, 1) and noisy_source in 0, 1, 2")
        if self.draws < 1 or self.judged < 0 or self.revealed < 1 or self.choose_steps < 1:
            raise ValueError(
                "ProjektorDigitsConfig needs draws >= 1, judged >= 0, revealed >= 1, choose_steps >= 1"
            )
        if self.test_per_class + self.val_per_class > 120:
            raise ValueError(
                "ProjektorDigitsConfig: test_per_class + val_per_class > 120 leaves the sources too few of a "
                "class's ~178 rows; keep the sum <= 120"
            )


@dataclass
class Sources:
    """One seed's data: each source's pixels and (possibly flipped) labels, and the held-out sets."""

    x: list[np.ndarray]
    y: list[np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    flipped: int
    """Rows of the noisy source whose label was flipped."""


def make_sources(pixels: np.ndarray, labels: np.ndarray, cfg: ProjektorDigitsConfig, seed: int) -> Sources:
    rng = np.random.default_rng([seed, _SPLIT_TAG])
    home = {k: g for g, ks in enumerate(GROUPS) for k in ks}
    rows: list[list[np.ndarray]] = [[], [], []]
    val, test = [], []
    for k in range(10):
        r = rng.permutation(np.flatnonzero(labels == k))
        t, v = cfg.test_per_class, cfg.val_per_class
        test.append(r[:t])
        val.append(r[t : t + v])
        rest = r[t + v :]
        cut = round(cfg.home_share * len(rest))
        mine, others = rest[:cut], rest[cut:]
        rows[home[k]].append(mine)
        half = len(others) // 2
        o = [g for g in range(3) if g != home[k]]
        rows[o[0]].append(others[:half])
        rows[o[1]].append(others[half:])
    idx = [np.sort(np.concatenate(r)) for r in rows]
    ys = [labels[i].copy() for i in idx]
    noisy = ys[cfg.noisy_source]
    flip = np.random.default_rng([seed, _NOISE_TAG]).permutation(len(noisy))[: round(cfg.noise * len(noisy))]
    # Another class, uniform over the other nine.
    noisy[flip] = (noisy[flip] + np.random.default_rng([seed, _NOISE_TAG, 1]).integers(1, 10, len(flip))) % 10
    val_i, test_i = np.sort(np.concatenate(val)), np.sort(np.concatenate(test))
    return Sources(
        [pixels[i] for i in idx],
        ys,
        (pixels[val_i], labels[val_i]),
        (pixels[test_i], labels[test_i]),
        len(flip),
    )


def simplex_grid(m: int, steps: int) -> np.ndarray:
    """Every mixture of ``m`` sources with shares in multiples of ``1/steps`` [C(steps+m-1, m-1), m]."""
    from itertools import product

    return np.array([c for c in product(range(steps + 1), repeat=m) if sum(c) == steps], dtype=float) / steps


def counts(p: np.ndarray, n: int) -> np.ndarray:
    """Largest-remainder rows per source for ``n`` rows of mixture ``p``."""
    raw = np.asarray(p, float) / np.sum(p) * n
    c = np.floor(raw).astype(np.int64)
    c[np.argsort(-(raw - c), kind="stable")[: n - c.sum()]] += 1
    return c


def run_error(src: Sources, p: np.ndarray, n: int, seed: int, draws: int) -> tuple[float, float]:
    """(validation error, test error) of a logistic regression on ``n`` rows of mixture ``p``, each averaged
    over ``draws`` seeded draws without replacement."""
    from mates_lab.acquisition.score import fit_predict

    c = counts(p, n)
    for i, (k, x) in enumerate(zip(c, src.x, strict=True)):
        if k > len(x):
            raise ValueError(
                f"{n} rows of mixture {np.round(p, 3).tolist()} need {k} rows of source {i}, which has "
                f"{len(x)}: lower the sizes (ProjektorDigitsConfig.sizes)"
            )
    val_err, test_err = [], []
    for r in range(draws):
        rng = np.random.default_rng([seed, n, r, _DRAW_TAG])
        pick = [rng.permutation(len(x))[:k] for k, x in zip(c, src.x, strict=True)]
        x = np.concatenate([xs[i] for xs, i in zip(src.x, pick, strict=True)])
        y = np.concatenate([ys[i] for ys, i in zip(src.y, pick, strict=True)])
        pred = fit_predict(x, y, np.concatenate([src.val[0], src.test[0]]))
        nv = len(src.val[1])
        val_err.append(float(np.mean(pred[:nv] != src.val[1])))
        test_err.append(float(np.mean(pred[nv:] != src.test[1])))
    return float(np.mean(val_err)), float(np.mean(test_err))


def power_law(l0: float, l1: float, n0: float, n1: float, n: float) -> float:
    """``a N^-b`` through (N0, L0) and (N1, L1), at N (an error of 0 stays 0)."""
    if l0 <= 0 or l1 <= 0:
        return min(l0, l1)
    b = -math.log(l1 / l0) / math.log(n1 / n0)
    return float(l1 * (n / n1) ** (-b))


def _ot_setup(src: Sources, cfg: ProjektorDigitsConfig, seed: int):
    """The OT's sources, target and keyword arguments (the DAM strategy's class-aware OT)."""
    from mates_lab.acquisition.strategies import _lava_config
    from mates_lab.bench.gotd_digits import embed
    from mates_megatron.ot import SinkhornConfig
    from mates_megatron.ot.valuation import label_distances

    allx = np.concatenate([*src.x, src.val[0], src.test[0]])
    n_src = sum(len(x) for x in src.x)
    emb = embed(allx, np.arange(n_src), cfg.pca_dims)  # fitted on the sources' rows only
    bounds = np.cumsum([0] + [len(x) for x in src.x])
    rng = np.random.default_rng([seed, _REVEAL_TAG])
    shown = [np.sort(rng.permutation(len(x))[: cfg.revealed]) for x in src.x]
    sources = [emb[lo:hi][s] for lo, hi, s in zip(bounds[:-1], bounds[1:], shown, strict=True)]
    labels = [src.y[i][s].astype(np.int64) for i, s in enumerate(shown)]
    target = emb[n_src : n_src + len(src.val[1])]
    ty = src.val[1].astype(np.int64)
    c, _ = _lava_config(seed)
    w = label_distances(
        np.concatenate(sources), np.concatenate(labels), target, ty,
        SinkhornConfig(epsilon=c.label_epsilon, cost_scale=0.5, seed=seed),
    )  # fmt: skip
    ot_cfg = SinkhornConfig(epsilon=0.1, cost_scale=0.5, max_iter=2000, tol=1e-4, dtype="float64", seed=seed)
    kw = {"source_labels": labels, "target_labels": ty, "label_cost": c.label_weight * w}
    return sources, target, ot_cfg, kw


def judged_mixtures(cfg: ProjektorDigitsConfig, seed: int) -> tuple[list[str], np.ndarray]:
    """Names and mixtures judged at N: uniform, the single sources, then seeded Dirichlet(1) mixtures."""
    rng = np.random.default_rng([seed, _JUDGED_TAG])
    ps = [np.full(3, 1 / 3), *np.eye(3), *rng.dirichlet(np.ones(3), size=cfg.judged)]
    names = ["uniform", "source0", "source1", "source2", *(f"dirichlet{j}" for j in range(cfg.judged))]
    return names, np.array(ps)


def run_seed(seed: int, cfg: ProjektorDigitsConfig) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    from mates_lab.acquisition.strategies import one_thread
    from mates_megatron.mixture.projektor import choose_mixture, fit_stage1, mixture_ot, projected

    pixels, labels = load_digits(return_X_y=True)
    src = make_sources(pixels, labels, cfg, seed)
    n0, n1, n = cfg.sizes
    pilots = simplex_grid(3, cfg.grid)
    names, judged = judged_mixtures(cfg, seed)
    err = lambda p, size: run_error(src, p, size, seed, cfg.draws)  # noqa: E731
    pilot_val = np.array([[err(p, s)[0] for s in (n0, n1)] for p in pilots])
    judged_err = np.array([[err(p, s) for s in (n0, n1, n)] for p in judged])  # [j, size, (val, test)]
    with one_thread():
        sources, target, ot_cfg, kw = _ot_setup(src, cfg, seed)
        ot = lambda p: mixture_ot(sources, p, target, ot_cfg, **kw)[0]  # noqa: E731
        pilot_ot = np.array([ot(p) for p in pilots])
        fit0, fit1 = (fit_stage1(pilot_ot, pilots, pilot_val[:, k], ridge=cfg.ridge) for k in range(2))
        model = projected(fit0, fit1, n0, n1, n)
        proj = np.array([model.predict(ot(p), p) for p in judged])
        best_pilot = pilots[
            int(np.argmin([model.predict(o, p) for o, p in zip(pilot_ot, pilots, strict=True)]))
        ]
        chosen, chosen_proj = choose_mixture(
            sources, target, fit0, fit1, n0, n1, n, ot_cfg, steps=cfg.choose_steps, starts=[best_pilot], **kw
        )
    law = np.array([power_law(e[0, 0], e[1, 0], n0, n1, n) for e in judged_err])
    actual_val, actual_test = judged_err[:, 2, 0], judged_err[:, 2, 1]
    chosen_val, chosen_test = err(chosen, n)
    single = int(np.argmin(actual_test[1:4]))
    return {
        "seed": seed,
        "sizes": {
            "sources": [len(x) for x in src.x],
            "val": len(src.val[1]),
            "test": len(src.test[1]),
            "flipped": src.flipped,
            "pilots": len(pilots),
            "n0": n0,
            "n1": n1,
            "n": n,
        },
        "stage1_rms": {"n0": fit0.rms_residual, "n1": fit1.rms_residual},
        "projection_mae": {
            "projektor": float(np.mean(np.abs(proj - actual_val))),
            "power_law": float(np.mean(np.abs(law - actual_val))),
        },
        "projection_mae_test": {
            "projektor": float(np.mean(np.abs(proj - actual_test))),
            "power_law": float(np.mean(np.abs(law - actual_test))),
        },
        "judged": [
            {
                "name": nm,
                "mixture": p.tolist(),
                "val_error": e[:, 0].tolist(),
                "test_error": e[:, 1].tolist(),
                "projektor": float(pj),
                "power_law": float(lw),
            }
            for nm, p, e, pj, lw in zip(names, judged, judged_err, proj, law, strict=True)
        ],  # fmt: skip
        "chosen_mixture": chosen.tolist(),
        "chosen_projected": chosen_proj,
        "chosen_val_error": chosen_val,
        "chosen_error": chosen_test,
        "uniform_error": float(actual_test[0]),
        "best_single_error": float(actual_test[1 + single]),
        "best_single": names[1 + single],
        "best_judged_error": float(actual_test.min()),
        "best_judged": names[int(np.argmin(actual_test))],
    }


ERRORS = ("chosen_error", "uniform_error", "best_single_error", "best_judged_error")


def bench_projektor_digits(seeds: list[int], cfg: ProjektorDigitsConfig | None = None) -> dict[str, Any]:
    cfg = cfg or ProjektorDigitsConfig()
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"projektor-digits needs distinct seeds, got {seeds}")
    runs = [run_seed(s, cfg) for s in seeds]
    return {
        "config": asdict(cfg),
        "seeds": list(seeds),
        "projection_mae": {
            k: mean_ci([r["projection_mae"][k] for r in runs]) for k in ("projektor", "power_law")
        },
        "projection_mae_test": {
            k: mean_ci([r["projection_mae_test"][k] for r in runs]) for k in ("projektor", "power_law")
        },
        **{k: mean_ci([r[k] for r in runs]) for k in ERRORS},
        "chosen_mixture": [r["chosen_mixture"] for r in runs],
        "paired": {
            f"chosen-{k.removesuffix('_error')}": mean_ci([r["chosen_error"] - r[k] for r in runs])
            for k in ERRORS[1:]
        },
        "per_seed": runs,
    }

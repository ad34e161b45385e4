"""`mates-lab bench gotd-digits`: GOT-D's pre-fine-tuning claim on a toy where it can be tested (issue 35).

    mates-lab bench gotd-digits --seeds 0 1 2 3 4 5 --out runs/gotd_digits.json

GOT-D (Kang et al., ICLR 2024) selects the data that moves the *pretraining* distribution toward the target:
the gradient of the OT distance between the candidate pool (the paper's proxy for the pretraining data) and
the target, so it favours candidates from the parts of the target that the pretraining data under-covers. A
look-alike selection (nearest to the target) does not. In ``bench ot`` the target domain sits inside the pool
and both pick the same documents by construction; here the pretraining data misses part of the target.

Setup (chosen from the paper's description before any figure was seen, and kept; every seed re-draws it):

- scikit-learn's ``load_digits`` (1,797 8x8 images, 10 classes of about 180).
- Per class, seeded: ``test_per_class`` = 50 rows to a balanced held-out test set that no selector and no
  embedding sees; ``target_per_class`` = 20 rows to a balanced target (the paper's small target set); the
  rest split in half, one half the pretraining set and the other the candidate pool (disjoint rows).
- Skew: ``rare_classes`` = 3 of the 10 classes, drawn per seed, keep ``rare_fraction`` = 5% of their rows in
  both the pretraining set and the pool (at least one row); so pool and pretraining share one distribution,
  as the paper assumes when it uses the pool as the proxy.
- Budget: ``budget_fraction`` = 5% of the pool (about 20 rows), the same for every arm.
- Embedding: PCA to ``pca_dims`` = 32 of the pixels, fitted on the pretraining rows only, each row
  L2-normalised (the OT scorers' convention: squared distances in [0, 4], so the absolute epsilon means the
  same thing as on text).
- Arms: ``gotd``: the 'gotd' scorer's code path (``gotd_values`` with ``GotdConfig``'s epsilon 0.1 and
  momentum 1.3) on the pool against the target, the lowest ``budget`` values; ``lookalike``: the
  'lookalike' scorer's ``lookalike_scores`` (k = 10) on the same embeddings, the lowest ``budget``;
  ``random``: a seeded draw of ``budget`` pool rows; ``none``: the pretraining set alone.
- Model: logistic regression (standardised pixels, scikit-learn defaults, ``max_iter`` 5000) trained on the
  pretraining rows and the arm's selection; figures: balanced accuracy on the held-out test set, recall on
  the rare classes, and the share of the selection drawn from the rare classes.

Reported per seed, and as a mean with a 95% t-interval over seeds; ``paired`` holds GOT-D minus each other
arm per seed with its interval (the arms share the seed's split, so the paired interval is the one to read).

What was measured is in ``docs/results/gotd.md``. Not here: the language-model version (a two-mode target).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mates_lab.bench.intervals import mean_ci

ARMS = ("gotd", "lookalike", "random", "none")


@dataclass(frozen=True)
class GotdDigitsConfig:
    """The toy's setup (see the module docstring for why these values)."""

    rare_classes: int = 3
    """Classes under-represented in the pretraining set and the pool (drawn per seed)."""
    rare_fraction: float = 0.05
    """Share of a rare class's rows kept in the pretraining set and the pool (at least one row each)."""
    target_per_class: int = 20
    """Rows per class of the balanced target set the selectors see."""
    test_per_class: int = 50
    """Rows per class of the balanced held-out test set (seen by no selector and no embedding)."""
    budget_fraction: float = 0.05
    """Rows selected, as a share of the pool; the same for every arm."""
    pca_dims: int = 32
    """Dimensions of the selectors' embedding (PCA fitted on the pretraining rows)."""
    lookalike_k: int = 10
    """Nearest target rows the look-alike score averages (the 'lookalike' scorer's default)."""

    def __post_init__(self) -> None:
        if not 1 <= self.rare_classes <= 9:
            raise ValueError(
                f"GotdDigitsConfig.rare_classes={self.rare_classes} must be in 1..9 (10 classes)"
            )
        if not 0 < self.rare_fraction <= 1:
            raise ValueError(f"GotdDigitsConfig.rare_fraction={self.rare_fraction} must be in (0, 1]")
        if not 0 < self.budget_fraction < 1:
            raise ValueError(f"GotdDigitsConfig.budget_fraction={self.budget_fraction} must be in (0, 1)")
        if self.target_per_class < 1 or self.test_per_class < 1:
            raise ValueError("GotdDigitsConfig needs target_per_class >= 1 and test_per_class >= 1")
        if self.target_per_class + self.test_per_class > 150:
            raise ValueError(
                f"GotdDigitsConfig: target_per_class + test_per_class = "
                f"{self.target_per_class + self.test_per_class} leaves too few of a class's ~178 rows for "
                "the pretraining set and the pool; keep the sum <= 150"
            )
        if not 1 <= self.pca_dims <= 64 or self.lookalike_k < 1:
            raise ValueError("GotdDigitsConfig needs pca_dims in 1..64 (8x8 pixels) and lookalike_k >= 1")


@dataclass
class DigitsSplit:
    """Row indices into ``load_digits`` of one seed's sets (pairwise disjoint)."""

    pretrain: np.ndarray
    pool: np.ndarray
    target: np.ndarray
    test: np.ndarray
    rare: np.ndarray
    """The rare classes."""


def split_digits(labels: np.ndarray, cfg: GotdDigitsConfig, seed: int) -> DigitsSplit:
    """One seed's split (see the module docstring)."""
    rng = np.random.default_rng([seed, 0x60D])
    classes = np.unique(labels)
    rare = np.sort(rng.choice(classes, size=cfg.rare_classes, replace=False))
    parts: dict[str, list[np.ndarray]] = {"pretrain": [], "pool": [], "target": [], "test": []}
    for k in classes:
        rows = rng.permutation(np.flatnonzero(labels == k))
        t, v = cfg.test_per_class, cfg.target_per_class
        parts["test"].append(rows[:t])
        parts["target"].append(rows[t : t + v])
        rest = rows[t + v :]
        half = len(rest) // 2
        pre, pool = rest[:half], rest[half : 2 * half]
        if k in rare:
            keep = max(1, round(cfg.rare_fraction * half))
            pre, pool = pre[:keep], pool[:keep]
        parts["pretrain"].append(pre)
        parts["pool"].append(pool)
    out = {name: np.sort(np.concatenate(p)) for name, p in parts.items()}
    return DigitsSplit(**out, rare=rare)


def embed(pixels: np.ndarray, fit_rows: np.ndarray, dims: int) -> np.ndarray:
    """PCA of the pixels fitted on ``fit_rows`` only, every row L2-normalised (float32)."""
    from sklearn.decomposition import PCA

    z = PCA(n_components=dims, random_state=0).fit(pixels[fit_rows]).transform(pixels)
    return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)


def budget_arms(
    x: np.ndarray, y: np.ndarray, ids: np.ndarray, budget: int, *, seed: int, rng: np.random.Generator,
    lookalike_k: int = 10,
) -> dict[str, np.ndarray]:  # fmt: skip
    """``budget`` of ``ids`` (the ids of the rows of ``x``), sorted, per arm: ``gotd`` (the lowest GOT-D values
    of ``x`` toward the target ``y``, the ``gotd`` scorer's code and defaults), ``lookalike`` (the highest mean
    cosine to the ``lookalike_k`` nearest target rows) and ``random`` (drawn from ``rng``). Shared by
    `bench gotd-digits` and `bench gotd-lm`."""
    from mates_megatron.ot.valuation import gotd_values
    from mates_megatron.scorers.gotd import GotdConfig
    from mates_megatron.scorers.lookalike import lookalike_scores

    g = GotdConfig()
    gotd, res = gotd_values(x, y, g.sinkhorn(seed, momentum=g.momentum))
    if not res.converged:
        raise RuntimeError(
            f"GOT-D's Sinkhorn did not converge (marginal error {res.marginal_error:.2g} after "
            f"{res.iterations} passes); raise GotdConfig.max_iter"
        )
    lowest = lambda v: ids[np.sort(np.argsort(v, kind="stable")[:budget])]  # noqa: E731
    return {
        "gotd": lowest(gotd),
        "lookalike": lowest(lookalike_scores(x, y, k=lookalike_k)),
        "random": np.sort(rng.choice(ids, size=budget, replace=False)),
    }


def select(
    emb: np.ndarray, split: DigitsSplit, budget: int, cfg: GotdDigitsConfig, seed: int
) -> dict[str, np.ndarray]:
    """Each arm's selected pool rows (indices into ``load_digits``), ``budget`` of them ('none': empty)."""
    rng = np.random.default_rng([seed, 0x7A2D])
    arms = budget_arms(emb[split.pool], emb[split.target], split.pool, budget, seed=seed, rng=rng,
                       lookalike_k=cfg.lookalike_k)  # fmt: skip
    return {**arms, "none": split.pool[:0]}


def evaluate(pixels: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, rare: np.ndarray):
    """(balanced accuracy, mean recall of the rare classes) on ``test`` of a logistic regression on ``train``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, recall_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    pred = model.fit(pixels[train], labels[train]).predict(pixels[test])
    recall = recall_score(labels[test], pred, labels=rare, average=None)
    return float(balanced_accuracy_score(labels[test], pred)), float(np.mean(recall))


def run_seed(seed: int, cfg: GotdDigitsConfig) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    pixels, labels = load_digits(return_X_y=True)
    split = split_digits(labels, cfg, seed)
    budget = max(1, round(cfg.budget_fraction * len(split.pool)))
    chosen = select(embed(pixels, split.pretrain, cfg.pca_dims), split, budget, cfg, seed)
    out: dict[str, Any] = {
        "seed": seed,
        "rare_classes": split.rare.tolist(),
        "sizes": {"pretrain": len(split.pretrain), "pool": len(split.pool), "budget": budget,
                  "target": len(split.target), "test": len(split.test)},
        "accuracy": {}, "rare_recall": {}, "rare_share": {}, "selected": {},
    }  # fmt: skip
    for arm, rows in chosen.items():
        acc, rare_recall = evaluate(
            pixels, labels, np.concatenate([split.pretrain, rows]), split.test, split.rare
        )
        out["accuracy"][arm], out["rare_recall"][arm] = acc, rare_recall
        if len(rows):
            out["rare_share"][arm] = float(np.isin(labels[rows], split.rare).mean())
        out["selected"][arm] = rows.tolist()
    return out


def bench_gotd_digits(seeds: list[int], cfg: GotdDigitsConfig | None = None) -> dict[str, Any]:
    cfg = cfg or GotdDigitsConfig()
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"gotd-digits needs distinct seeds, got {seeds}")
    runs = [run_seed(s, cfg) for s in seeds]
    summary = lambda key, arms: {a: mean_ci([r[key][a] for r in runs]) for a in arms}  # noqa: E731
    return {
        "config": asdict(cfg),
        "seeds": list(seeds),
        "accuracy": summary("accuracy", ARMS),
        "rare_recall": summary("rare_recall", ARMS),
        "rare_share": summary("rare_share", ARMS[:3]),
        "paired": {
            f"gotd-{a}": mean_ci([r["accuracy"]["gotd"] - r["accuracy"][a] for r in runs]) for a in ARMS[1:]
        },
        "per_seed": runs,
    }

"""Projektor (Kang et al., NeurIPS 2023): performance of a data mixture projected from pilot runs on partial
samples of each source, and the mixture chosen by gradient steps on the projection.

- OT of a mixture: the entropic OT value between the p-weighted mixture of the sources' revealed samples
  (each row of source i carries mass ``p_i / n_i``) and the validation data; its gradient in ``p`` is each
  source's mean candidate potential (``d a_k / d p_i = 1 / n_i`` for the rows k of source i), centred over
  the sources (the simplex's tangent: the source-level calibrated gradient).
- Stage 1, at each pilot size: performance regressed on ``[OT(p), p, p * OT(p), p^2 * OT(p)]`` over the
  pilot mixtures (no separate intercept: the ``p`` terms sum to one). On the simplex the regressors are
  collinear (``OT = sum_i p_i OT``: 3m independent directions for 3m + 1 coefficients), so the coefficients
  are not unique though the fitted function is; ridge picks the small-norm one, and keeps the fit defined
  when pilots are fewer than 3m.
- Stage 2, to an undisclosed larger size N from the pilot sizes N0 < N1:
  ``L(N) = [log(N/N0) L(N1) - log(N/N1) L(N0)] / log(N1/N0)`` (linear in log N through both pilots). It is
  linear in L(N0), L(N1), so the projection at N is one regression with coefficients
  ``w0 * c0 + w1 * c1``.
- The mixture: projected gradient descent on the simplex (``p >= floor``) of the projected performance,
  whose gradient comes from the chain rule through the features and the OT gradient; backtracking keeps
  every accepted step a decrease. Performance is minimised: pass a loss or an error rate.

The LM side (pilot runs of the project's loop on the mixture selector, `mates-megatron mixture projektor`)
is ``plan_projektor`` / ``run_projektor`` / ``fit_projektor``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mates_megatron.mixture.ddo import project_capped_simplex
from mates_megatron.mixture.weights import MixtureError, WeightSchedule, constant, write_weights
from mates_megatron.ot.sinkhorn import SinkhornConfig, sinkhorn

PLAN = "projektor.json"
# A source weighted 0 keeps this share of its mass in the transport: the solver needs positive weights, and a
# zero-mass row's potential (its c-transform, which the gradient needs) is computed the same way.
_MIN_MASS = 1e-9


def mixture_ot(
    sources: Sequence[np.ndarray],
    p: np.ndarray,
    target: np.ndarray,
    cfg: SinkhornConfig,
    *,
    source_labels: Sequence[np.ndarray] | None = None,
    target_labels: np.ndarray | None = None,
    label_cost: np.ndarray | None = None,
) -> tuple[float, np.ndarray]:
    """The entropic OT value between the ``p``-mixture of ``sources`` and ``target``, and its source-level
    calibrated gradient in ``p`` (mean-centred over the sources)."""
    p = _check_p(p, len(sources))
    if any(len(s) == 0 for s in sources):
        raise ValueError("every source needs at least one revealed row")
    q = np.maximum(p, _MIN_MASS)
    q /= q.sum()
    x = np.concatenate([np.asarray(s, dtype=np.float32) for s in sources])
    a = np.concatenate([np.full(len(s), qi / len(s)) for s, qi in zip(sources, q, strict=True)])
    labels = None if source_labels is None else np.concatenate([np.asarray(v) for v in source_labels])
    res = sinkhorn(x, target, cfg, a=a, label_cost=label_cost, x_labels=labels, y_labels=target_labels)
    bounds = np.cumsum([0] + [len(s) for s in sources])
    grad = np.array([res.f[lo:hi].mean() for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)])
    return res.value, grad - grad.mean()


def _check_p(p, m: int) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.shape != (m,) or not np.isfinite(p).all() or (p < 0).any() or not p.sum() > 0:
        raise ValueError(f"a mixture must be {m} finite non-negative ratios with a positive sum, got {p}")
    return p / p.sum()


def features(ot: float, p: np.ndarray) -> np.ndarray:
    """Stage 1's regressors ``[OT, p, p * OT, p^2 * OT]`` (length 3m + 1)."""
    p = np.asarray(p, dtype=np.float64)
    return np.concatenate([[ot], p, p * ot, p * p * ot])


@dataclass
class Stage1:
    """The stage-1 regression at one pilot size."""

    coef: np.ndarray
    """Coefficients of ``features`` (3m + 1)."""
    ridge: float
    rms_residual: float
    """Root mean square residual on the pilots it was fitted on."""

    def predict(self, ot: float, p: np.ndarray) -> float:
        return float(features(ot, p) @ self.coef)

    def to_dict(self) -> dict[str, Any]:
        return {"coef": self.coef.tolist(), "ridge": self.ridge, "rms_residual": self.rms_residual}


def fit_stage1(ots: np.ndarray, ps: np.ndarray, perf: np.ndarray, *, ridge: float = 1e-3) -> Stage1:
    """Ridge least squares of ``perf`` [k] on ``features(ots[j], ps[j])`` over k pilot mixtures."""
    ots, ps, perf = np.asarray(ots, float), np.atleast_2d(np.asarray(ps, float)), np.asarray(perf, float)
    if not (len(ots) == len(ps) == len(perf)) or len(perf) < 2:
        raise ValueError(
            f"stage 1 needs as many OT values, mixtures and results, at least 2 (got {len(ots)}, "
            f"{len(ps)}, {len(perf)})"
        )
    if not (np.isfinite(ots).all() and np.isfinite(perf).all()):
        raise ValueError("stage 1 got a NaN or infinite OT value or result: a pilot run diverged?")
    if ridge < 0:
        raise ValueError(f"ridge={ridge} must be >= 0")
    x = np.stack([features(o, p) for o, p in zip(ots, ps, strict=True)])
    coef = np.linalg.lstsq(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ perf, rcond=None)[0]
    rms = float(np.sqrt(np.mean((x @ coef - perf) ** 2)))
    return Stage1(coef, ridge, rms)


def stage2_weights(n0: float, n1: float, n: float) -> tuple[float, float]:
    """``(w0, w1)`` with ``L(N) = w0 L(N0) + w1 L(N1)`` (w0 + w1 = 1)."""
    if not 0 < n0 < n1 or not n > 0:
        raise ValueError(f"stage 2 needs 0 < N0 < N1 and N > 0, got N0={n0}, N1={n1}, N={n}")
    d = math.log(n1 / n0)
    return -math.log(n / n1) / d, math.log(n / n0) / d


def stage2(l0, l1, n0: float, n1: float, n: float):
    """``[log(N/N0) L(N1) - log(N/N1) L(N0)] / log(N1/N0)`` (scalars or arrays)."""
    w0, w1 = stage2_weights(n0, n1, n)
    return w0 * np.asarray(l0, dtype=np.float64) + w1 * np.asarray(l1, dtype=np.float64)


def projected(fit0: Stage1, fit1: Stage1, n0: float, n1: float, n: float) -> Stage1:
    """The regression of the stage-2 projection at ``n`` (stage 2 applied to the coefficients)."""
    w0, w1 = stage2_weights(n0, n1, n)
    return Stage1(w0 * fit0.coef + w1 * fit1.coef, fit1.ridge, float("nan"))


def _gradient(coef: np.ndarray, ot: float, dot: np.ndarray, p: np.ndarray) -> np.ndarray:
    """d/dp of ``features(OT(p), p) @ coef`` given OT and its gradient."""
    m = len(p)
    c_ot, c_p, c_pot, c_p2ot = coef[0], coef[1 : 1 + m], coef[1 + m : 1 + 2 * m], coef[1 + 2 * m :]
    through_ot = c_ot + c_pot @ p + c_p2ot @ (p * p)
    return c_p + ot * (c_pot + 2 * c_p2ot * p) + through_ot * dot


def choose_mixture(
    sources: Sequence[np.ndarray],
    target: np.ndarray,
    fit0: Stage1,
    fit1: Stage1,
    n0: float,
    n1: float,
    n: float,
    cfg: SinkhornConfig,
    *,
    floor: float = 0.0,
    steps: int = 100,
    lr: float = 0.5,
    tol: float = 1e-6,
    starts: Sequence[np.ndarray] | None = None,
    source_labels: Sequence[np.ndarray] | None = None,
    target_labels: np.ndarray | None = None,
    label_cost: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """The mixture minimising the projected performance at size ``n`` (from uniform, and from every mixture
    in ``starts``; the best end point wins), and its projected performance."""
    m = len(sources)
    if not 0 <= floor <= 1 / m:
        raise ValueError(f"floor={floor} must be in [0, 1/{m}] (every source at least floor)")
    model = projected(fit0, fit1, n0, n1, n)
    kw = {"source_labels": source_labels, "target_labels": target_labels, "label_cost": label_cost}

    def value(p: np.ndarray) -> tuple[float, np.ndarray]:
        ot, dot = mixture_ot(sources, p, target, cfg, **kw)
        return model.predict(ot, p), _gradient(model.coef, ot, dot, p)

    best_p, best_v = None, math.inf
    for start in [np.full(m, 1.0 / m), *(starts or [])]:
        p = project_capped_simplex(_check_p(start, m), 1.0, floor)
        v, g = value(p)
        step = lr
        for _ in range(steps):
            while step > 1e-8:
                cand = project_capped_simplex(p - step * g, 1.0, floor)
                cv, cg = value(cand)
                if cv < v - 1e-12:
                    break
                step /= 2
            else:
                break  # no decrease along the projected gradient: a (local) minimum
            moved = float(np.abs(cand - p).max())
            p, v, g, step = cand, cv, cg, min(step * 2, lr)
            if moved < tol:
                break
        if v < best_v:
            best_p, best_v = p, v
    return best_p, float(best_v)


# --- pilot runs of the project's loop -------------------------------------------------------------------


def pilot_simplex(m: int, count: int, seed: int, *, vertex_share: float = 1.0) -> np.ndarray:
    """``count`` pilot mixtures of ``m`` sources [count, m]: uniform, one per source with ``vertex_share`` on it
    (1: the source alone; less: the rest spread evenly over the others), then seeded Dirichlet(1) mixtures,
    rounded to 4 decimals (they are written into weight files) and renormalised."""
    if count < m + 2:
        raise MixtureError(
            f"{count} pilot mixtures: at least {m + 2} (uniform, {m} single sources, one more)"
        )
    if not 1 / m <= vertex_share <= 1:
        raise MixtureError(f"vertex_share={vertex_share}: use a share in [1/{m}, 1]")
    eye = np.eye(m)
    rest = (1 - vertex_share) / (m - 1) if m > 1 else 0.0
    rng = np.random.default_rng([seed, 0x9F0])
    ps = [np.full(m, 1.0 / m), *(vertex_share * eye + rest * (1 - eye))]
    ps += [np.round(rng.dirichlet(np.ones(m)), 4) for _ in range(count - m - 1)]
    return np.array([p / p.sum() for p in ps])


def pilot_mixtures(domains: Sequence[str], count: int, seed: int) -> list[dict[str, float]]:
    """Uniform, every single source, then seeded Dirichlet(1) mixtures up to ``count`` (``pilot_simplex``)."""
    return [dict(zip(domains, p.tolist(), strict=True)) for p in pilot_simplex(len(domains), count, seed)]


def _pilot_dir(work: Path, j: int, steps: int) -> Path:
    return Path(work) / "pilots" / f"mix{j:02d}_{steps}"


def plan_projektor(
    base_config: Path, work: Path, *, pilot_steps: tuple[int, int], mixtures: int, eval_set: str,
    sources: Path, revealed: int, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """``work/projektor.json`` and every pilot run's config: each pilot mixture at both pilot sizes.
    ``sources``: JSONL of the sources' documents (``text``, ``domain``), of which ``revealed`` documents per
    domain (seeded) are the revealed sample the OT reads."""
    from mates_megatron.mixture.plan import pool_domains, write_run_config

    n0, n1 = pilot_steps
    if not 0 < n0 < n1:
        raise MixtureError(f"pilot steps {pilot_steps}: two sizes N0 < N1 are needed")
    cfg = yaml.safe_load(Path(base_config).read_text()) or {}
    if eval_set not in (cfg.get("eval_sets") or {}):
        raise MixtureError(
            f"{base_config}: eval_sets has no {eval_set!r}: the pilots' performance is its loss, and its "
            "texts are the validation data the OT compares the sources with"
        )
    if not Path(sources).is_file():
        raise MixtureError(f"sources {sources}: no such file (JSONL with 'text' and 'domain' per line)")
    domains = pool_domains(cfg)
    mixes = pilot_mixtures(domains, mixtures, seed)
    plan = {
        "base_config": str(base_config), "pilot_steps": [n0, n1], "domains": domains, "mixtures": mixes,
        "eval_set": eval_set, "eval_path": str(cfg["eval_sets"][eval_set]), "sources": str(sources),
        "revealed": revealed, "seed": seed, "global_batch_size": int(cfg.get("global_batch_size", 1)),
    }  # fmt: skip
    if (work / PLAN).is_file():
        old = json.loads((work / PLAN).read_text())
        if old != plan:
            diff = sorted(k for k in plan if old.get(k) != plan[k])
            raise MixtureError(
                f"{work / PLAN} holds a plan with other {', '.join(diff)}; use another --work directory, or "
                "remove this one to plan there again"
            )
        return plan
    work.mkdir(parents=True, exist_ok=True)
    for j, w in enumerate(mixes):
        wfile = write_weights(work / "weights" / f"mix{j:02d}.json", constant(w, {"method": "pilot"}))
        for steps in pilot_steps:
            write_run_config(cfg, _pilot_dir(work, j, steps), wfile, steps)
    (work / PLAN).write_text(json.dumps(plan, indent=1))
    return plan


def read_projektor_plan(work: Path) -> dict[str, Any]:
    p = Path(work) / PLAN
    if not p.is_file():
        raise MixtureError(f"{p}: no Projektor plan here; write one with `mates-megatron mixture projektor`")
    return json.loads(p.read_text())


def run_projektor(work: Path, runner=None) -> None:
    """Train every unfinished pilot (a finished one is skipped, an interrupted one resumes)."""
    from mates_megatron.mixture.plan import train_once

    plan = read_projektor_plan(work)
    todo = [(j, s) for j in range(len(plan["mixtures"])) for s in plan["pilot_steps"]]
    t0 = time.perf_counter()
    for i, (j, s) in enumerate(todo, 1):
        d = _pilot_dir(work, j, s)
        state = "done before" if (d / "metrics.json").is_file() else f"{time.perf_counter() - t0:.0f}s so far"
        print(f"[projektor] pilot {i}/{len(todo)} mix{j:02d} at {s} steps | {state}", flush=True)
        train_once(d / "config.yaml", runner)


def mean_loss(metrics: dict[str, Any], eval_set: str, domains: Sequence[str]) -> float:
    """The mean over domains of the final ``eval_set`` loss (the performance Projektor projects)."""
    from mates_megatron.mixture.plan import objective

    return float(np.mean(list(objective(metrics, eval_set, list(domains))[1].values())))


def revealed_texts(sources: Path, domains: Sequence[str], per_domain: int, seed: int) -> list[list[str]]:
    """A seeded sample of ``per_domain`` documents of each domain (the revealed part of each source)."""
    by: dict[str, list[str]] = {d: [] for d in domains}
    for line in Path(sources).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r.get("domain") in by:
                by[r["domain"]].append(r["text"])
    out = []
    for i, d in enumerate(domains):
        if not by[d]:
            raise MixtureError(
                f"{sources}: no document of domain {d!r}; every source needs a revealed sample"
            )
        rng = np.random.default_rng([seed, 0x5EE, i])
        keep = rng.choice(len(by[d]), size=min(per_domain, len(by[d])), replace=False)
        out.append([by[d][k] for k in np.sort(keep)])
    return out


def embed_sources(plan: dict[str, Any], work: Path, *, max_length: int = 128):
    """Embeddings of the revealed samples (one array per source) and of the validation texts, cached in
    ``work/embeddings.npz`` (keyed by the texts' hash)."""
    texts = revealed_texts(Path(plan["sources"]), plan["domains"], plan["revealed"], plan["seed"])
    val = [json.loads(x)["text"] for x in Path(plan["eval_path"]).read_text().splitlines() if x.strip()]
    key = hashlib.sha256(json.dumps([texts, val, max_length]).encode()).hexdigest()
    cache = Path(work) / "embeddings.npz"
    if cache.is_file() and str(np.load(cache)["key"]) == key:
        z = np.load(cache)
        return [z[f"s{i}"] for i in range(len(texts))], z["val"]
    from mates_megatron.encoder import Encoder, EncoderConfig

    emb = Encoder(EncoderConfig(max_length=max_length, batch_size=32))
    t = time.perf_counter()
    srcs = [emb.embed(t_) for t_ in texts]
    y = emb.embed(val)
    print(f"[projektor] embedded {sum(map(len, texts))} revealed and {len(val)} validation texts in "
          f"{time.perf_counter() - t:.0f}s", flush=True)  # fmt: skip
    np.savez(cache, key=key, val=y, **{f"s{i}": s for i, s in enumerate(srcs)})
    return srcs, y


@dataclass
class ProjektorFit:
    """Everything the fit knows: the pilots' OT values and losses, both stage-1 fits."""

    domains: list[str]
    mixtures: np.ndarray
    ots: np.ndarray
    losses: np.ndarray
    """[mixtures, 2]: the measured mean validation loss at each pilot size."""
    sizes: tuple[int, int]
    """Pilot sizes in samples."""
    fits: tuple[Stage1, Stage1]

    def predict(self, ot: float, p: np.ndarray, n: float) -> float:
        return projected(*self.fits, *self.sizes, n).predict(ot, p)


OT_CONFIG = SinkhornConfig(epsilon=0.1, cost_scale=1.0, max_iter=2000, tol=1e-4, dtype="float64")


def fit_projektor(work: Path, *, ridge: float = 1e-3, max_length: int = 128):
    """The pilots' OT values and losses and the two stage-1 fits, with the sources' and validation
    embeddings."""
    plan = read_projektor_plan(work)
    sources, y = embed_sources(plan, work, max_length=max_length)
    domains = plan["domains"]
    ps = np.array([[w[d] for d in domains] for w in plan["mixtures"]])
    ots = np.array([mixture_ot(sources, p, y, OT_CONFIG)[0] for p in ps])
    losses = np.zeros((len(ps), 2))
    for j in range(len(ps)):
        for k, s in enumerate(plan["pilot_steps"]):
            path = _pilot_dir(work, j, s) / "metrics.json"
            if not path.is_file():
                raise MixtureError(f"{path}: pilot mix{j:02d} at {s} steps has not finished; run the pilots")
            losses[j, k] = mean_loss(json.loads(path.read_text()), plan["eval_set"], domains)
    fits = tuple(fit_stage1(ots, ps, losses[:, k], ridge=ridge) for k in range(2))
    sizes = tuple(s * plan["global_batch_size"] for s in plan["pilot_steps"])
    return ProjektorFit(domains, ps, ots, losses, sizes, fits), sources, y


def projektor_weights(
    work: Path, target_steps: int, *, floor: float = 0.0, ridge: float = 1e-3, max_length: int = 128
) -> WeightSchedule:
    """Projektor's mixture for ``target_steps`` (the pilots' batch and sequence), as a weights schedule whose
    source records the fits and every pilot's projection."""
    plan = read_projektor_plan(work)
    fit, sources, y = fit_projektor(work, ridge=ridge, max_length=max_length)
    n = target_steps * plan["global_batch_size"]
    # Start also from the pilot mixture projected best: the projection is not convex in p.
    proj = [fit.predict(o, p, n) for o, p in zip(fit.ots, fit.mixtures, strict=True)]
    start = fit.mixtures[int(np.argmin(proj))]
    p, value = choose_mixture(sources, y, *fit.fits, *fit.sizes, n, OT_CONFIG, floor=floor, starts=[start])
    weights = dict(zip(fit.domains, p.tolist(), strict=True))
    return constant(
        weights,
        {
            "method": "projektor", "work": str(work), "target_steps": target_steps, "target_samples": n,
            "projected_loss": value, "floor": floor, "pilot_sizes_samples": list(fit.sizes),
            "stage1": [f.to_dict() for f in fit.fits],
            "pilots": [{"weights": dict(zip(fit.domains, q.tolist(), strict=True)), "ot": float(o),
                        "losses": ls.tolist(), "projected": float(pr)}
                       for q, o, ls, pr in zip(fit.mixtures, fit.ots, fit.losses, proj, strict=True)],
            "ot_config": asdict(OT_CONFIG),
        },
    )  # fmt: skip

"""Projektor: stage 2 against hand-computed values, stage 1 recovering its coefficients, the mixture's OT
gradient against finite differences, the chosen mixture against a dense simplex grid, and the pilot plan
(resumable, the fit and the weights file) on pilots whose losses follow the stage-1 model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from mates_megatron.mixture.projektor import (
    Stage1,
    choose_mixture,
    features,
    fit_projektor,
    fit_stage1,
    mixture_ot,
    pilot_mixtures,
    plan_projektor,
    projected,
    projektor_weights,
    run_projektor,
    stage2,
)
from mates_megatron.mixture.weights import MixtureError, read_weights
from mates_megatron.ot import SinkhornConfig

# Tiny transports on 2 busy cores: torch on one thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = SinkhornConfig(epsilon=0.1, max_iter=5000, tol=1e-10, dtype="float64")


def test_stage2_against_hand_computed_values():
    # 100 -> 3.0 and 200 -> 2.5: the line in log N loses 0.5 per doubling, so 800 -> 1.5 and 400 -> 2.0;
    # by the formula [log(8) 2.5 - log(4) 3.0] / log(2) = (3 * 2.5 - 2 * 3.0) / 1 = 1.5.
    assert stage2(3.0, 2.5, 100, 200, 800) == pytest.approx(1.5, abs=1e-12)
    assert stage2(3.0, 2.5, 100, 200, 400) == pytest.approx(2.0, abs=1e-12)
    assert stage2(3.0, 2.5, 100, 200, 100) == pytest.approx(3.0, abs=1e-12)  # passes through both pilots
    assert stage2(3.0, 2.5, 100, 200, 200) == pytest.approx(2.5, abs=1e-12)
    # Unequal spacing: N0=10, N1=30, N=90 -> [log 9 * L1 - log 3 * L0] / log 3 = 2 L1 - L0.
    assert stage2(4.0, 3.0, 10, 30, 90) == pytest.approx(2.0, abs=1e-12)
    assert np.allclose(stage2(np.array([4.0, 5.0]), np.array([3.0, 4.5]), 10, 30, 90), [2.0, 4.0])
    with pytest.raises(ValueError, match="0 < N0 < N1"):
        stage2(1.0, 1.0, 200, 100, 800)


def test_stage1_recovers_its_coefficients():
    rng = np.random.default_rng(0)
    m = 3
    true = rng.normal(size=3 * m + 1)
    ps = rng.dirichlet(np.ones(m), size=20)
    ots = rng.uniform(0.5, 1.5, size=20)
    perf = np.array([features(o, p) @ true for o, p in zip(ots, ps, strict=True)])
    fit = fit_stage1(ots, ps, perf, ridge=0.0)
    assert fit.rms_residual < 1e-9
    # The paper's regressors are collinear on the simplex (OT = sum_i p_i OT): the coefficients are one
    # representative, the function is the one that generated the data, also at points it never saw.
    x = np.stack([features(o, p) for o, p in zip(ots, ps, strict=True)])
    assert np.linalg.matrix_rank(x) == 3 * m
    for o, p in zip(rng.uniform(0.5, 1.5, 5), rng.dirichlet(np.ones(m), size=5), strict=True):
        assert fit.predict(o, p) == pytest.approx(features(o, p) @ true, abs=1e-9)
    assert features(2.0, np.array([0.5, 0.5])).tolist() == [2.0, 0.5, 0.5, 1.0, 1.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_stage1(np.array([1.0, np.nan]), ps[:2], perf[:2])


def _clouds(seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    sources = [c + 0.2 * rng.normal(size=(12 + 3 * i, 2)) for i, c in enumerate(centres)]
    target = np.concatenate(
        [centres[0] + 0.2 * rng.normal(size=(8, 2)), centres[1] + 0.2 * rng.normal(size=(8, 2))]
    )
    return sources, target


def test_mixture_ot_gradient_matches_finite_differences():
    sources, target = _clouds()
    p = np.array([0.5, 0.3, 0.2])
    _, grad = mixture_ot(sources, p, target, CFG)
    assert abs(grad.sum()) < 1e-12
    h = 1e-5
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        e = np.zeros(3)
        e[i], e[j] = h, -h
        fd = (mixture_ot(sources, p + e, target, CFG)[0] - mixture_ot(sources, p - e, target, CFG)[0]) / (
            2 * h
        )
        assert fd == pytest.approx(grad[i] - grad[j], rel=1e-4, abs=1e-7)
    # The target sits between sources 0 and 1: moving mass to source 2 raises the distance.
    assert grad[2] > max(grad[0], grad[1])
    with pytest.raises(ValueError, match="non-negative ratios"):
        mixture_ot(sources, np.array([0.5, -0.1, 0.6]), target, CFG)


def test_chosen_mixture_is_the_grid_minimum():
    """A projection that is convex in p (OT is convex in the masses; positive OT coefficient plus a linear
    term): the projected gradient descent ends at the minimum of a dense simplex grid."""
    sources, target = _clouds(1)
    cfg = SinkhornConfig(epsilon=0.1, max_iter=5000, tol=1e-7, dtype="float64")
    m = 3
    c0 = np.concatenate([[1.0], [0.30, 0.0, 0.1], np.zeros(2 * m)])
    c1 = np.concatenate([[0.8], [0.25, 0.0, 0.05], np.zeros(2 * m)])
    fit0, fit1 = Stage1(c0, 0.0, 0.0), Stage1(c1, 0.0, 0.0)
    model = projected(fit0, fit1, 10, 20, 80)
    p, v = choose_mixture(sources, target, fit0, fit1, 10, 20, 80, cfg, steps=300, tol=1e-9)
    grid = [
        np.array([a, b, 1 - a - b])
        for a in np.linspace(0, 1, 41)
        for b in np.linspace(0, 1, 41)
        if a + b <= 1 + 1e-12
    ]
    vals = [
        model.predict(mixture_ot(sources, np.maximum(q, 0), target, cfg)[0], np.maximum(q, 0)) for q in grid
    ]
    assert v == pytest.approx(model.predict(mixture_ot(sources, p, target, cfg)[0], p), abs=1e-12)
    assert v <= min(vals) + 1e-6
    assert np.abs(p - grid[int(np.argmin(vals))]).max() <= 0.067  # within two grid steps of the grid's best
    floored, _ = choose_mixture(sources, target, fit0, fit1, 10, 20, 80, cfg, floor=0.2)
    assert floored.min() >= 0.2 - 1e-12 and floored.sum() == pytest.approx(1.0)


def _setup(tmp_path, domains=("a", "b", "c")):
    (tmp_path / "train.meta.json").write_text(json.dumps({"domains": list(domains)}))
    val = [{"text": f"{d} validation text number {i}", "domain": d} for d in domains for i in range(3)]
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps(r) for r in val) + "\n")
    docs = [{"text": f"{d} source document {i} " + "word " * (i + 3 * k), "domain": d}
            for k, d in enumerate(domains) for i in range(6)]  # fmt: skip
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in docs) + "\n")
    cfg = {"data_prefix": str(tmp_path / "train"), "global_batch_size": 8, "model": {"seq_length": 16},
           "eval_sets": {"val": str(tmp_path / "val.jsonl")}, "selection": {"pool": "indexed"}}  # fmt: skip
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(cfg))


def _runner(calls, fail_at=None):
    """What a finished pilot writes: every domain's validation loss ``3 - 0.5 log2(steps/10) + 0.4 p_a``."""
    from mates_megatron.mixture.weights import read_weights as rw

    def run(config, args):
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt("killed")
        cfg = yaml.safe_load(config.read_text())
        calls.append(config.parent.name)
        w = rw(cfg["selection"]["selector_options"]["weights"]).at(0)
        loss = 3.0 - 0.5 * math.log2(cfg["train_iters"] / 10) + 0.4 * w["a"]
        (config.parent / "metrics.json").write_text(
            json.dumps({"eval": {f"val/{d}": [9.0, loss] for d in w}})
        )
        return 0

    return run


def test_pilots_resume_and_the_fit_projects_them(tmp_path):
    _setup(tmp_path)
    work = tmp_path / "pk"
    plan = plan_projektor(tmp_path / "base.yaml", work, pilot_steps=(10, 20), mixtures=6, eval_set="val",
                          sources=tmp_path / "corpus.jsonl", revealed=4, seed=0)  # fmt: skip
    assert plan["mixtures"][:4] == [{"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, {"a": 1.0, "b": 0.0, "c": 0.0},
                                    {"a": 0.0, "b": 1.0, "c": 0.0}, {"a": 0.0, "b": 0.0, "c": 1.0}]  # fmt: skip
    assert pilot_mixtures(["a", "b", "c"], 6, 0) == plan["mixtures"]
    cfg = yaml.safe_load((work / "pilots/mix01_20/config.yaml").read_text())
    assert cfg["train_iters"] == 20 and cfg["selection"]["selector"] == "mixture"
    calls: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_projektor(work, _runner(calls, fail_at=5))
    run_projektor(work, _runner(calls))
    assert len(calls) == 12 and len(set(calls)) == 12  # the 5 finished pilots were not run again
    fit, sources, y = fit_projektor(work, ridge=1e-9)
    assert [len(s) for s in sources] == [4, 4, 4] and len(y) == 9
    # The losses are linear in p, so stage 1 fits them and stage 2 follows the line in log N: 80 samples x 8.
    for q, o in zip(fit.mixtures, fit.ots, strict=True):
        assert fit.predict(o, q, 80 * 8) == pytest.approx(3.0 - 0.5 * 3 + 0.4 * q[0], abs=1e-4)
    schedule = projektor_weights(work, 80, floor=0.05)
    w = schedule.at(0)
    # The projection is lowest with the least of a (each unit of p_a costs 0.4): a at the floor.
    assert w["a"] == pytest.approx(0.05, abs=1e-3) and sum(w.values()) == pytest.approx(1.0)
    assert schedule.source["method"] == "projektor" and len(schedule.source["pilots"]) == 6
    # The command line on the finished pilots: nothing is trained again, the same weights are written.
    from mates_megatron.cli import main

    rc = main(["mixture", "projektor", "--config", str(tmp_path / "base.yaml"), "--eval-set", "val",
               "--pilot-steps", "10", "20", "--target-steps", "80", "--floor", "0.05", "--work", str(work),
               "--mixtures", "6", "--revealed", "4", "--sources", str(tmp_path / "corpus.jsonl"),
               "--out", str(tmp_path / "w.json")])  # fmt: skip
    assert rc == 0 and read_weights(tmp_path / "w.json").at(0) == pytest.approx(w, abs=1e-9)
    with pytest.raises(MixtureError, match="holds a plan with other pilot_steps; use another --work"):
        plan_projektor(tmp_path / "base.yaml", work, pilot_steps=(10, 30), mixtures=6, eval_set="val",
                       sources=tmp_path / "corpus.jsonl", revealed=4, seed=0)  # fmt: skip
    with pytest.raises(MixtureError, match="has not finished"):
        (work / "pilots/mix03_10/metrics.json").unlink()
        fit_projektor(work)


def test_plan_errors_name_the_fix(tmp_path):
    _setup(tmp_path)
    with pytest.raises(MixtureError, match="eval_sets has no 'test'"):
        plan_projektor(tmp_path / "base.yaml", tmp_path / "pk", pilot_steps=(10, 20), mixtures=6,
                       eval_set="test", sources=tmp_path / "corpus.jsonl", revealed=4)  # fmt: skip
    with pytest.raises(MixtureError, match="two sizes N0 < N1"):
        plan_projektor(tmp_path / "base.yaml", tmp_path / "pk", pilot_steps=(20, 20), mixtures=6,
                       eval_set="val", sources=tmp_path / "corpus.jsonl", revealed=4)  # fmt: skip
    with pytest.raises(MixtureError, match="at least 5"):
        pilot_mixtures(["a", "b", "c"], 4, 0)

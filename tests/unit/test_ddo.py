"""DDO and AutoScale: the curve fit, the constrained optimum against scipy's SLSQP, the extrapolation against
hand-computed amounts, the proxy plan's runs, and a planning job that resumes where it stopped."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from scipy.optimize import minimize

from mates_megatron.mixture.autoscale import autoscale_amounts
from mates_megatron.mixture.autoscale import autoscale_weights as predict
from mates_megatron.mixture.ddo import DomainFit, fit_domain, optimise_amounts, project_capped_simplex
from mates_megatron.mixture.plan import fit_plan, proxy_runs, read_plan, run_plan, write_plan
from mates_megatron.mixture.weights import MixtureError, read_weights, write_weights

X = np.array([1 / 3, 1.0, 3.0])
TRUE = [(0.5, 0.3, 0.2), (2.0, 1.0, 0.5), (0.1, 0.05, 0.9), (1.0, 0.5, 0.1), (0.3, 0.2, 0.3)]


def _curve(a, b, c, x):
    return (np.asarray(x) + a) ** (-b) + c


def test_fit_passes_through_the_three_points():
    for a, b, c in TRUE:
        y = _curve(a, b, c, X)
        f = fit_domain(X, y, floor=0.2)
        assert f.residual < 1e-10 and np.allclose(f(X), y, atol=1e-10)
        assert f.a > -0.2 and 0 <= f.b <= 10
    # Relative to the base (the paper's y), three points need not lie on the form (the unit of x is fixed):
    # the fit is then the best the form allows, no worse than a dense grid over (a, b) with c solved.
    y = _curve(1.0, 0.5, 0.1, X) / _curve(1.0, 0.5, 0.1, 1.0)
    f = fit_domain(X, y, floor=0.2)
    ga, gb = np.linspace(-0.19, 20, 400), np.linspace(0, 10, 400)
    pw = (X[None, None] + ga[:, None, None]) ** (-gb[None, :, None])
    grid = ((pw + (y - pw).mean(-1, keepdims=True) - y) ** 2).sum(-1).min()
    assert 0 < ((f(X) - y) ** 2).sum() <= grid + 1e-12 and f.residual > 1e-4
    # More of a harmful domain raises the objective: the decreasing form cannot follow, it goes flat.
    harmful = fit_domain(X, np.array([0.99, 1.0, 1.02]), floor=0.2)
    assert harmful.b < 1e-6


def _slsqp(fits, total, floor):
    a, b = np.array([f.a for f in fits]), np.array([f.b for f in fits])
    res = minimize(
        lambda n: np.sum((n + a) ** (-b)), np.full(len(fits), total / len(fits)), method="SLSQP",
        bounds=[(floor, None)] * len(fits), constraints=[{"type": "eq", "fun": lambda n: n.sum() - total}],
        options={"ftol": 1e-15, "maxiter": 2000},
    )  # fmt: skip
    return res.x


@pytest.mark.parametrize("floor", [0.2, 0.5])
def test_optimum_matches_scipy_slsqp(floor):
    fits = [DomainFit(a, b, c, 0.0) for a, b, c in TRUE]
    n = optimise_amounts(fits, floor=floor)
    assert abs(n.sum() - 5) < 1e-9 and n.min() >= floor - 1e-12
    assert np.abs(n - _slsqp(fits, 5.0, floor)).max() < 1e-5
    # The floor binds for at least one domain at 0.5 (the check covers the projection's active set).
    assert floor == 0.2 or np.isclose(n, floor).any()


def test_projection_onto_the_capped_simplex():
    rng = np.random.default_rng(0)
    for _ in range(50):
        v = rng.normal(size=6) * 3
        p = project_capped_simplex(v, 4.0, 0.3)
        assert abs(p.sum() - 4.0) < 1e-12 and p.min() >= 0.3 - 1e-12
        ref = minimize(
            lambda n, v=v: np.sum((n - v) ** 2), np.full(6, 4 / 6), method="SLSQP", bounds=[(0.3, None)] * 6,
            constraints=[{"type": "eq", "fun": lambda n: n.sum() - 4}], options={"ftol": 1e-15},
        )  # fmt: skip
        assert np.abs(p - ref.x).max() < 1e-5
    with pytest.raises(ValueError, match="below 6 domains x floor 1"):
        project_capped_simplex(np.zeros(6), 4.0, 1.0)


def test_autoscale_extrapolation_by_hand():
    # N(t) = (1 * (2/1)^t, 2 * (2/2)^t) = (2^t, 2): a budget of 10 needs 2^t = 8, t = 3.
    amounts, t = autoscale_amounts(np.array([1.0, 2.0]), np.array([2.0, 2.0]), 10.0)
    assert t == pytest.approx(3.0) and np.allclose(amounts, [8.0, 2.0])
    # The paper's step: t = 2 is N2 * N2 / N1, per domain.
    n1, n2 = np.array([3.0, 1.0, 2.0]), np.array([4.0, 3.0, 3.0])
    target = float(np.sum(n2 * n2 / n1))
    amounts, t = autoscale_amounts(n1, n2, target)
    assert t == pytest.approx(2.0) and np.allclose(amounts, n2 * n2 / n1)
    with pytest.raises(ValueError, match="from a smaller budget to a larger one"):
        autoscale_amounts(n2, n1, 20.0)


def test_proxy_plan_runs():
    runs = proxy_runs(["a", "b", "c"], 30)
    assert [r.name for r in runs] == ["base", "a_x0.333", "a_x3", "b_x0.333", "b_x3", "c_x0.333", "c_x3"]
    assert runs[0].train_iters == 30 and runs[0].weights == pytest.approx(
        {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    )
    up = runs[2]  # a at 3 units, b and c at 1: 5 units of 10 samples-per-unit-step -> 50 steps
    assert up.train_iters == 50 and up.weights == pytest.approx({"a": 0.6, "b": 0.2, "c": 0.2})
    down = runs[1]  # 2 1/3 units -> round(23.33) = 23 steps
    assert down.train_iters == 23 and down.weights["a"] == pytest.approx((1 / 3) / (7 / 3))
    with pytest.raises(MixtureError, match="0 < down < 1 < up"):
        proxy_runs(["a", "b"], 10, down=2.0)


def _plan(tmp_path, domains=("a", "b", "c")):
    prefix = tmp_path / "train"
    (tmp_path / "train.meta.json").write_text(json.dumps({"domains": list(domains)}))
    (tmp_path / "val.jsonl").write_text("")
    cfg = {"data_prefix": str(prefix), "global_batch_size": 8, "model": {"seq_length": 16},
           "eval_sets": {"val": str(tmp_path / "val.jsonl")}, "selection": {"pool": "indexed"}}  # fmt: skip
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(cfg))
    return write_plan(tmp_path / "base.yaml", tmp_path / "plan", steps=30, eval_set="val")


def _fake_runner(curves, calls, fail_at=None):
    """Writes what a finished run writes: per-domain validation losses whose objective (the mean over domains
    of exp(loss)) is 2.0 for the base and ``2.0 * y_d(x)`` for domain d's run at x units, with
    ``y_d(x) = (x + a)^(-b) + c`` and c set so that y_d(1) = 1 (the form DDO fits, relative to the base)."""

    def run(config, args):
        cfg = yaml.safe_load(config.read_text())
        name = config.parent.name
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt("killed")
        calls.append(name)
        weights = read_weights(cfg["selection"]["selector_options"]["weights"]).at(0)
        objective = 2.0
        if name != "base":
            d = name.rsplit("_x", 1)[0]
            a, b = curves[d]
            x = weights[d] * cfg["train_iters"] * len(weights) / 30  # the units it served
            objective *= _curve(a, b, 1 - (1 + a) ** (-b), x)
        metrics = {"eval": {f"val/{d}": [9.0, math.log(objective)] for d in weights}}
        (config.parent / "metrics.json").write_text(json.dumps(metrics))
        return 0

    return run


def test_a_killed_plan_resumes_and_the_fit_finds_the_optimum(tmp_path):
    plan = _plan(tmp_path)
    assert read_plan(tmp_path / "plan")["domains"] == ["a", "b", "c"] and len(plan["runs"]) == 7
    cfg = yaml.safe_load((tmp_path / "plan/runs/a_x3/config.yaml").read_text())
    assert cfg["train_iters"] == 50 and cfg["selection"]["selector"] == "mixture"
    assert cfg["load"] == cfg["save"] == str(tmp_path / "plan/runs/a_x3/ckpt")
    curves = {"a": (0.5, 1.0), "b": (1.0, 0.3), "c": (0.2, 2.0)}
    calls: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_plan(tmp_path / "plan", _fake_runner(curves, calls, fail_at=3))
    assert calls == ["base", "a_x0.333", "a_x3"]
    run_plan(tmp_path / "plan", _fake_runner(curves, calls))
    assert calls[3:] == ["b_x0.333", "b_x3", "c_x0.333", "c_x3"]  # the finished three are not run again
    with pytest.raises(MixtureError, match="mixture run` first"):
        (tmp_path / "plan/runs/c_x3/metrics.json").rename(tmp_path / "gone.json")
        fit_plan(tmp_path / "plan")
    (tmp_path / "gone.json").rename(tmp_path / "plan/runs/c_x3/metrics.json")
    schedule = fit_plan(tmp_path / "plan")
    # The runs lie on the form, so each fit passes through its three points (relative to the base) ...
    fitted = schedule.source["fits"]
    assert all(f["residual"] < 1e-8 for f in fitted.values())
    for d, (a, b) in curves.items():
        # at the amounts the runs served (23 steps serve 0.329 units, not 1/3)
        x = [r["x"] for r in schedule.source["runs"].values() if r["domain"] == d]
        assert x[0] == pytest.approx((1 / 3) / (7 / 3) * 23 * 3 / 30)
        assert np.allclose(DomainFit(**fitted[d])(x), _curve(a, b, 1 - (1 + a) ** (-b), x), atol=1e-7)
    # ... but three points do not always fix (a, b, c): for a's curve (0.5, 1.0) another exact solution
    # exists, and it extrapolates differently. The weights are the optimum of the fitted curves.
    best = optimise_amounts([DomainFit(**fitted[d]) for d in "abc"])
    w = schedule.at(0)
    assert np.allclose([w[d] for d in "abc"], best / best.sum(), atol=1e-9)
    assert w["b"] == pytest.approx(0.2 / 3)  # b (b = 0.3: little gain from more of it) sits at the floor
    assert schedule.source["budget_samples"] == 240 and schedule.source["method"] == "ddo"


def test_predict_from_two_weight_files(tmp_path):
    from mates_megatron.mixture.weights import constant

    def ddo(name, steps, amounts):
        return write_weights(tmp_path / name, constant(amounts, {
            "method": "ddo", "steps": steps, "budget_samples": steps * 8,
            "amounts_samples": amounts}))  # fmt: skip

    small = ddo("s.json", 10, {"a": 40.0, "b": 40.0})
    large = ddo("l.json", 20, {"a": 120.0, "b": 40.0})
    # a triples, b stays: (40 * 3^t, 40) = 640 samples (80 steps x 8) -> 3^t = 15.
    s = predict(small, large, 80)
    assert s.source["t"] == pytest.approx(math.log(15) / math.log(3))
    assert s.at(0) == pytest.approx({"a": 600 / 640, "b": 40 / 640})
    write_weights(tmp_path / "u.json", constant({"a": 1, "b": 1}))
    with pytest.raises(MixtureError, match="not a DDO result"):
        predict(tmp_path / "u.json", large, 80)


def test_cli_writes_the_plan_and_the_predicted_weights(tmp_path, capsys):
    from mates_megatron.cli import main
    from mates_megatron.mixture.weights import constant

    _plan(tmp_path)
    assert main(["mixture", "plan", "--config", str(tmp_path / "base.yaml"), "--steps", "20",
                 "--eval-set", "val", "--out", str(tmp_path / "p2")]) == 0  # fmt: skip
    assert len(read_plan(tmp_path / "p2")["runs"]) == 7
    assert "7 proxy runs (" in capsys.readouterr().out
    assert main(["mixture", "plan", "--config", str(tmp_path / "base.yaml"), "--steps", "20",
                 "--eval-set", "heldout", "--out", str(tmp_path / "p3")]) == 2  # fmt: skip
    assert "eval_sets has no 'heldout' (has ['val'])" in capsys.readouterr().err
    for name, steps, amounts in (("s", 10, {"a": 40.0, "b": 40.0}), ("l", 20, {"a": 120.0, "b": 40.0})):
        write_weights(tmp_path / f"{name}.json", constant(amounts, {
            "method": "ddo", "steps": steps, "budget_samples": steps * 8, "amounts_samples": amounts}))  # fmt: skip
    out = tmp_path / "mix" / "auto.json"
    assert main(["mixture", "predict", "--small", str(tmp_path / "s.json"), "--large", str(tmp_path / "l.json"),
                 "--steps", "80", "--out", str(out)]) == 0  # fmt: skip
    assert read_weights(out).at(0) == pytest.approx({"a": 600 / 640, "b": 40 / 640})


def test_a_run_directory_is_never_taken_for_a_run_of_other_weights(tmp_path):
    from mates_megatron.mixture.plan import write_run_config
    from mates_megatron.mixture.weights import constant

    a = write_weights(tmp_path / "a.json", constant({"x": 1, "y": 1}))
    b = write_weights(tmp_path / "b.json", constant({"x": 1, "y": 3}))
    cfg = {"data_prefix": "d", "selection": {"pool": "indexed"}}
    run = tmp_path / "run"
    path = write_run_config(cfg, run, a, 10)
    assert yaml.safe_load(path.read_text())["selection"]["selector_options"]["weights"] == str(
        run / "weights.json"
    )
    write_run_config(cfg, run, b, 10)  # nothing trained there yet: rewritten
    (run / "metrics.json").write_text("{}")
    write_run_config(cfg, run, b, 10)  # the same run again: fine (train_once then skips it)
    with pytest.raises(MixtureError, match="holds a run of another config or other weights"):
        write_run_config(cfg, run, a, 10)
    with pytest.raises(MixtureError, match="holds a run of another config or other weights"):
        write_run_config(cfg, run, b, 12)
    assert read_weights(run / "weights.json").at(0) == pytest.approx({"x": 0.25, "y": 0.75})


def test_replicates_are_fitted_on_the_mean_objective(tmp_path):
    import shutil

    _plan(tmp_path)
    run_plan(tmp_path / "plan", _fake_runner({"a": (0.5, 1.0), "b": (1.0, 0.3), "c": (0.2, 2.0)}, []))
    shutil.copytree(tmp_path / "plan", tmp_path / "plan2")
    m = tmp_path / "plan2/runs/a_x3/metrics.json"
    metrics = json.loads(m.read_text())
    metrics["eval"] = {k: [v[0], v[1] + math.log(1.5)] for k, v in metrics["eval"].items()}  # objective x 1.5
    m.write_text(json.dumps(metrics))
    one = fit_plan(tmp_path / "plan").source["runs"]["a_x3"]["objective"]
    both = fit_plan([tmp_path / "plan", tmp_path / "plan2"]).source["runs"]["a_x3"]
    assert both["replicates"] == pytest.approx([one, 1.5 * one]) and both["objective"] == pytest.approx(
        1.25 * one
    )
    other = json.loads((tmp_path / "plan2/plan.json").read_text())
    other["runs"][1]["train_iters"] += 1
    (tmp_path / "plan2/plan.json").write_text(json.dumps(other))
    with pytest.raises(MixtureError, match="not a replicate of"):
        fit_plan([tmp_path / "plan", tmp_path / "plan2"])

"""The demo's report: the crossing step, the ratios and the plot, from two runs' metrics."""

from __future__ import annotations

import json

import pytest

from mates_megatron.demo import _run_configs, build_report, crossing_step, plot_report

SHARES = [{"code": 0.7, "docs": 0.3}, {"code": 0.4, "docs": 0.6}]


def _run(losses, seconds, selection=None):
    run = {"eval_step": [0, 10, 20, 30, 40], "reference_loss": losses, "seconds": seconds}
    if selection is not None:
        run["selection"] = selection
    return run


def _selection(selection_seconds):
    rec = {"round": 1, "influence_spearman": 0.5, "seconds": {"probe": 2.0, "total": selection_seconds}}
    return {
        "select_every": 20,
        "domains": ["code", "docs"],
        "selected_share_by_domain": SHARES,
        "rounds": [rec],
        "selection_seconds": selection_seconds,
    }


def test_crossing_step_interpolates_between_evaluations():
    steps, losses = [0, 10, 20], [5.0, 4.0, 2.0]
    assert crossing_step(steps, losses, 3.0) == pytest.approx(15.0)
    assert crossing_step(steps, losses, 4.0) == 10.0
    assert crossing_step(steps, losses, 6.0) == 0.0
    assert crossing_step(steps, losses, 1.0) is None


def test_report_ratios(tmp_path):
    random_run = _run([6.0, 5.0, 4.5, 4.2, 4.0], [1.0] * 40)
    # MATES reaches 4.0 halfway between steps 20 (4.2) and 30 (3.8): step 25. Its steps cost 1 s, plus 10 s
    # of selection at the end of step 20.
    seconds = [1.0] * 40
    seconds[19] += 10.0
    mates_run = _run([6.0, 4.8, 4.2, 3.8, 3.6], seconds, _selection(10.0))
    report = build_report(random_run, mates_run)
    assert report["mates_steps_to_random_final"] == pytest.approx(25.0)
    assert report["steps_to_random_final_ratio"] == pytest.approx(25 / 40)
    assert report["wall_clock_ratio"] == pytest.approx((25 + 10) / 40)
    assert report["selection_overhead_fraction"] == pytest.approx(10 / 40)
    assert report["mates"]["selected_share_by_domain"] == SHARES
    assert report["mates"]["influence_spearman"] == [0.5]
    json.dumps(report)  # JSON-ready
    plot_report(report, tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_when_mates_never_reaches_random():
    report = build_report(
        _run([6.0, 5.0, 4.5, 4.2, 4.0], [1.0] * 40),
        _run([6.0, 5.0, 4.6, 4.3, 4.1], [1.0] * 40, _selection(0.0)),
    )
    assert report["steps_to_random_final_ratio"] is None and report["wall_clock_ratio"] is None


def test_run_configs_differ_only_in_the_selector_and_scorer():
    sel = {"selector": "gumbel", "scorer": "mates", "seed": 1, "temperature": 0.5}
    cfg = {"seed": 1, "train_iters": 10, "selection": sel}
    runs = _run_configs(cfg, seed=7)
    assert runs["random"]["selection"] == {**sel, "selector": "random", "scorer": "none", "seed": 7}
    assert runs["mates"]["selection"] == {**sel, "seed": 7}
    assert runs["random"]["seed"] == runs["mates"]["seed"] == 7
    assert cfg["seed"] == 1  # the loaded config is not modified
    with pytest.raises(ValueError, match="has no scorer: set scorer: mates"):
        _run_configs({"selection": {"selector": "random"}}, seed=None)

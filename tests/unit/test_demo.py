"""The demo's report: the crossing step, the ratios and the plot, from two runs' metrics."""

from __future__ import annotations

import json

import pytest

from mates_lab.demo import (
    ARMS,
    _run_configs,
    build_report,
    crossing_step,
    format_table,
    parse_arms,
    plot_report,
)

SHARES = [{"code": 0.7, "docs": 0.3}, {"code": 0.4, "docs": 0.6}]


def _run(losses, seconds, selection=None, held=None):
    held = losses if held is None else held
    run = {
        "eval_step": [0, 10, 20, 30, 40],
        "reference_loss": losses,
        "eval": {"held": held, "held/docs": [1.0] * 5},
        "seconds": seconds,
    }
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
    report = build_report({"random": random_run, "mates": mates_run}, "held")
    assert report["mates_steps_to_random_final"] == pytest.approx(25.0)
    assert report["steps_to_random_final_ratio"] == pytest.approx(25 / 40)
    assert report["wall_clock_ratio"] == pytest.approx((25 + 10) / 40)
    assert report["selection_overhead_fraction"] == pytest.approx(10 / 40)
    mates = report["arms"]["mates"]
    # Training without the round, the round apart, and both (the round was counted twice before).
    assert (mates["train_seconds"], mates["selection_seconds"], mates["wall_seconds"]) == (40.0, 10.0, 50.0)
    # The loop's own split when the metrics carry it (the hooks' seconds at each step's end).
    hooks = [0.0] * 40
    hooks[19] = 10.5
    timed = build_report({"random": random_run, "mates": {**mates_run, "hook_seconds": hooks}}, "held")
    assert timed["arms"]["mates"]["train_seconds"] == pytest.approx(39.5)
    assert mates["selected_share_by_domain"] == SHARES
    assert mates["influence_spearman"] == [0.5] and mates["fallback_rounds"] == []
    json.dumps(report)  # JSON-ready
    plot_report(report, tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mates" in format_table(report)


def test_heldout_figures_are_read_from_smoothed_curves():
    # Held-out curves, smoothed over 3 evaluations: random [6, 5.5, 5.1667, 4.6667, 4.3333] ends at 13/3;
    # the arm's smoothed curve [6, 5, 4.5, 4.1333, 3.9] crosses 13/3 between steps 20 (4.5) and 30 (4.1333).
    random_run = _run([9.0] * 5, [1.0] * 40, held=[6.0, 5.0, 4.5, 4.5, 4.0])
    arm_run = _run([9.0] * 5, [2.0] * 40, _selection(0.0), held=[6.0, 4.0, 3.5, 4.9, 3.3])
    report = build_report({"random": random_run, "dsir": arm_run}, "held")
    arm = report["arms"]["dsir"]
    assert report["random_final_heldout_loss"] == pytest.approx(13 / 3)
    assert arm["final_heldout_loss"] == pytest.approx((3.5 + 4.9 + 3.3) / 3)
    cross = 20 + 10 * (4.5 - 13 / 3) / (4.5 - (4.0 + 3.5 + 4.9) / 3)
    assert arm["steps_to_random_final_heldout"] == pytest.approx(cross)
    assert arm["steps_to_random_final_heldout_ratio"] == pytest.approx(cross / 40)
    assert arm["wall_clock_ratio"] == pytest.approx(2 * cross / 40)
    assert arm["final_eval"]["held/docs"] == pytest.approx(1.0)
    # Random's own smoothed curve reaches its final at its last step.
    assert report["arms"]["random"]["steps_to_random_final_heldout_ratio"] == pytest.approx(1.0)
    assert "steps_to_random_final_ratio" not in report  # the probe-set MATES figures need a mates arm


def test_the_second_headline_averages_every_heldout_domain():
    """Each domain weighted alike: the arm wins its headline domain by what it gives up on the other, and the
    average shows it level with random."""
    evals = {"held/a": [6.0, 5.0, 4.0, 3.0, 2.0], "held/b": [6.0, 6.0, 6.0, 6.0, 6.0], "held": [6.0] * 5}
    random_evals = {
        "held/a": [6.0, 5.5, 5.0, 4.5, 4.0],
        "held/b": [6.0, 5.5, 5.0, 4.5, 4.0],
        "held": [6.0] * 5,
    }
    random_run = {**_run([9.0] * 5, [1.0] * 40), "eval": random_evals}
    arm_run = {**_run([9.0] * 5, [1.0] * 40, _selection(0.0)), "eval": evals}
    report = build_report({"random": random_run, "classifier": arm_run}, "held/a")
    arm = report["arms"]["classifier"]
    assert arm["all_domains_sets"] == ["held/a", "held/b"]
    # Both mean curves are [6, 5.5, 5, 4.5, 4]; smoothed over 3 they end at the mean of the last three.
    assert arm["final_heldout_loss_all_domains"] == pytest.approx((5.0 + 4.5 + 4.0) / 3)
    assert report["random_final_heldout_loss_all_domains"] == pytest.approx((5.0 + 4.5 + 4.0) / 3)
    assert arm["steps_to_random_final_heldout_ratio"] < 1  # its headline domain: ahead of random
    assert arm["steps_to_random_final_heldout_all_domains_ratio"] == pytest.approx(1.0)  # the average: level
    assert "all-domain" in format_table(report)


def test_report_names_a_missing_headline_set():
    runs = {"random": _run([6.0] * 5, [1.0] * 40), "mates": _run([6.0] * 5, [1.0] * 40, _selection(0.0))}
    with pytest.raises(ValueError, match="evaluation set 'other' was not logged"):
        build_report(runs, "other")


def test_report_when_mates_never_reaches_random():
    report = build_report(
        {
            "random": _run([6.0, 5.0, 4.5, 4.2, 4.0], [1.0] * 40),
            "mates": _run([6.0, 5.0, 4.6, 4.3, 4.1], [1.0] * 40, _selection(0.0), held=[6.0] * 5),
        },
        "held",
    )
    assert report["steps_to_random_final_ratio"] is None and report["wall_clock_ratio"] is None
    assert report["arms"]["mates"]["steps_to_random_final_heldout_ratio"] is None
    assert "never" in format_table(report)


def test_run_configs_differ_only_in_the_selection():
    sel = {"selector": {"kind": "gumbel", "temperature": 0.5}, "scorer": {"kind": "mates", "probe_samples": 32},
           "seed": 1, "warmup_steps": 20}  # fmt: skip
    cfg = {"seed": 1, "train_iters": 10, "selection": sel}
    runs = _run_configs(cfg, seed=7, arms=ARMS)
    assert list(runs) == list(ARMS)
    mates = {"probe_samples": 32}
    sel = {"selector": "gumbel", "selector_options": {"temperature": 0.5}, "scorer": "mates",
           "scorer_options": mates, "seed": 1, "warmup_steps": 20}  # the sections, as they are read  # fmt: skip
    seeded = {**sel, "seed": 7}

    def arm(selector, scorer, **options):  # the config's warm-up, as every arm (warmup_steps 20 in seeded)
        return {
            **seeded,
            "selector": selector,
            "selector_options": {},
            "scorer": scorer,
            "scorer_options": options,
        }

    assert runs["random"]["selection"] == arm("random", "none")
    assert runs["mates"]["selection"] == seeded
    assert runs["static"]["selection"] == {**seeded, "scorer": "static"}
    assert runs["dsir"]["selection"] == arm("importance", "dsir")
    assert runs["classifier"]["selection"] == arm("topk", "classifier")
    assert runs["lava"]["selection"] == arm("topk", "lava", max_length=128)
    assert runs["gotd"]["selection"] == arm("topk", "gotd", max_length=128)
    assert all(r["seed"] == 7 and r["train_iters"] == 10 for r in runs.values())
    variants = _run_configs(
        cfg, seed=None, arms=["mates_target", "mates_all", "mates_single", "lookalike", "group_mates",
                              "classifier>group_mates"]
    )  # fmt: skip
    stacked = variants["classifier>group_mates"]["selection"]
    assert stacked == {
        **variants["group_mates"]["selection"],
        "filters": [{"kind": "classifier", "keep": 0.5}],
    }
    assert variants["lookalike"]["selection"]["scorer"] == "lookalike"
    group = variants["group_mates"]["selection"]
    assert group["selector"] == "cluster_greedy" and group["scorer"] == "group_mates"
    assert group["scorer_options"] == {"probe_samples": 40, "estimator": "linearized_rollout",  # rollouts of 10
                                       "influence": {"model": "relational"}}  # fmt: skip
    from mates_megatron.config import SelectionConfig
    from mates_megatron.configio import build

    built = build(
        SelectionConfig, {**group, "select_every": 20}, where="arm"
    )  # the test's warm-up is 20 steps
    assert built.scorer_config.influence.relational.rollout_length == 10
    assert variants["mates_target"]["selection"] == {
        **sel,
        "scorer_options": {**mates, "probe_tokens": "target"},
    }
    assert variants["mates_all"]["selection"] == {**sel, "scorer_options": {**mates, "probe_tokens": "all"}}
    assert variants["mates_single"]["selection"] == {
        **sel,
        "scorer_options": {**mates, "influence_rounds": 1},
    }
    assert (
        cfg["seed"] == 1 and cfg["selection"]["scorer"]["kind"] == "mates"
    )  # the loaded config is not modified
    with pytest.raises(ValueError, match="has no scorer: set scorer: mates"):
        _run_configs({"selection": {"selector": "random"}}, seed=None)


def test_parse_arms():
    assert parse_arms("mates") == ["random", "mates"]  # random is always run: the ratios read against it
    assert parse_arms("dsir, random,mates") == ["random", "mates", "dsir"]
    assert parse_arms("all") == list(ARMS)
    assert parse_arms("mates_target,mates") == ["random", "mates", "mates_target"]
    assert parse_arms("mates_single,mates") == ["random", "mates", "mates_single"]
    assert parse_arms("gotd,lava,lookalike") == ["random", "lava", "gotd", "lookalike"]
    with pytest.raises(ValueError, match=r"unknown arm\(s\) \['best'\]"):
        parse_arms("mates,best")

"""`bench demo-seeds`: the demo's arms read over seeds, paired differences and issue 36's targets."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import t

from mates_lab.bench.demo_seeds import bench_demo_seeds, seed_dir

ARMS = "random,mates,classifier,group_mates,classifier>group_mates"
# Final held-out loss per seed, arm and domain (constant curves: the smoothed final is the value itself).
DOCS = {  # the headline domain
    "random": [5.0, 5.2, 5.1], "mates": [4.8, 5.0, 5.0], "classifier": [4.7, 4.9, 4.8],
    "group_mates": [4.75, 4.95, 4.9], "classifier>group_mates": [4.6, 4.85, 4.7],
}  # fmt: skip
JUNK = {  # another held-out domain, where selection toward docs gives ground
    "random": [6.0, 6.1, 6.0], "mates": [6.4, 6.5, 6.3], "classifier": [6.2, 6.2, 6.1],
    "group_mates": [6.1, 6.2, 6.2], "classifier>group_mates": [6.1, 6.2, 6.1],
}  # fmt: skip


def _metrics(docs: float, junk: float, selection_seconds: float) -> dict:
    steps = [0, 10, 20, 30]
    curve = lambda v: [v + 1.0, v, v, v]  # noqa: E731
    return {
        "eval_step": steps,
        "reference_loss": curve(docs),
        "eval": {"heldout/python_docs": curve(docs), "heldout/junk": curve(junk)},
        "seconds": [1.0] * 30,
        "selection": {
            "selection_seconds": selection_seconds,
            "rounds": [{"round": 1, "fallback": None}, {"round": 2, "fallback": "a poor fit"}],
        },
    }


def _write_seeds(work, seeds, arms=tuple(DOCS)):
    for i, s in enumerate(seeds):
        for a in arms:
            d = seed_dir(work, s) / a
            d.mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps(_metrics(DOCS[a][i], JUNK[a][i], 2.0)))


def _ci(values):
    v = np.asarray(values)
    half = t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return v.mean(), [v.mean() - half, v.mean() + half]


def test_paired_differences_and_targets_by_hand(tmp_path):
    _write_seeds(tmp_path, [11, 12, 13])
    out = bench_demo_seeds(tmp_path / "none.yaml", tmp_path, [11, 12, 13], ARMS, run=False)
    s = out["summary"]
    assert s["seeds"] == [11, 12, 13] and out["seeds_missing"] == []
    # The stacked arm against the classifier on the headline domain, and on both domains averaged.
    stacked = np.subtract(DOCS["classifier>group_mates"], DOCS["classifier"])
    mean, ci = _ci(stacked)
    got = s["paired"]["classifier>group_mates-classifier"]["final"]
    assert got["mean"] == pytest.approx(mean) and got["ci95"] == pytest.approx(ci)
    every = lambda a: (np.add(DOCS[a], JUNK[a])) / 2  # noqa: E731
    mean_all, _ = _ci(every("classifier>group_mates") - every("classifier"))
    assert s["paired"]["classifier>group_mates-classifier"]["final_all"]["mean"] == pytest.approx(mean_all)
    # Per domain: MATES's worst gap to random is junk, +0.367; Group-MATES's +0.133, within half of it.
    assert s["domains"]["mates"]["worst"] == "heldout/junk"
    assert s["domains"]["mates"]["worst_gap"] == pytest.approx(
        np.mean(np.subtract(JUNK["mates"], JUNK["random"]))
    )
    tg = s["targets"]
    assert tg["stacked_below_classifier"]["final"]["mean_below"] is True
    assert tg["stacked_below_classifier"]["final"]["interval_below"] is bool(ci[1] < 0)
    assert tg["group_mates_worst_domain_gap"]["met"] is True
    assert tg["group_mates_worst_domain_gap"]["gap"] == pytest.approx(
        np.mean(np.subtract(JUNK["group_mates"], JUNK["random"]))
    )
    gm = every("group_mates") - every("mates")
    assert tg["group_mates_at_or_below_mates_all_domains"]["at_or_below"] is bool(gm.mean() <= 0)
    assert s["arms"]["classifier"]["steps_ratio"]["never"] == 0
    # Each arm's second scored round fell back to a uniform draw: 3 of the 6 rounds over the seeds were scored.
    assert s["arms"]["group_mates"]["fallback_rounds"] == [1, 1, 1]
    assert tg["group_mates_rounds_selected_by_scores"] == 3


def test_unfinished_seeds_are_left_out_and_named(tmp_path):
    _write_seeds(tmp_path, [1, 2])
    # Seed 3 has stopped after two arms: it is not read (its differences would not be paired).
    for a in ("random", "mates"):
        d = seed_dir(tmp_path, 3) / a
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(_metrics(5.0, 6.0, 0.0)))
    out = bench_demo_seeds(tmp_path / "none.yaml", tmp_path, [1, 2, 3], ARMS, run=False)
    assert out["summary"]["seeds"] == [1, 2] and out["seeds_missing"] == [3]
    with pytest.raises(RuntimeError, match=r"no seed of \[3\] has finished every arm"):
        bench_demo_seeds(tmp_path / "none.yaml", tmp_path, [3], ARMS, run=False)
    with pytest.raises(ValueError, match="unknown arm"):
        bench_demo_seeds(tmp_path / "none.yaml", tmp_path, [1], "random,magic", run=False)

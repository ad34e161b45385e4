"""The evidence machinery inside the training loop (TP=2, CPU): evaluation sets logged whole and per domain,
the 'static' scorer (the influence model fitted at the first scored round, then reused without probes,
resuming exactly), and the poor-fit guard that falls back to the random draw."""

from __future__ import annotations

import json

import pytest

from mates_megatron.compat.spawn import run_on_ranks
from tests.integration.test_mates_round import EVERY, _train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


STATIC = {"scorer": "static"}  # _train turns the poor-fit guard off: this tests the reuse, not the guard


@pytest.fixture(scope="module")
def eval_sets(small_embedded, tmp_path_factory):
    """'same': the probe reference itself (its loss must equal reference_loss exactly); 'docs': plain text
    documents of two domains (logged per domain)."""
    out = tmp_path_factory.mktemp("eval_sets")
    rows = [json.loads(line) for line in (small_embedded["dir"] / "corpus.jsonl").open()]
    picked = [r for r in rows if r["domain"] == "python_code"][:5] + [
        r for r in rows if r["domain"] == "junk"
    ][:3]
    docs = out / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": r["text"], "domain": r["domain"]}) + "\n" for r in picked))
    return {"same": small_embedded["reference"], "docs": str(docs)}


@pytest.fixture(scope="module")
def static_run(small_embedded, eval_sets):
    overrides = {"eval_sets": eval_sets, "selection": STATIC}
    return run_on_ranks(_train, 2, small_embedded, overrides)


def test_eval_sets_are_logged_whole_and_per_domain(static_run):
    import numpy as np

    history = static_run[0]["history"]
    assert history["eval"] == static_run[1]["history"]["eval"]
    # The probe reference as an evaluation set: the same batches, the same loss, bit for bit.
    assert history["eval"]["same"] == history["reference_loss"]
    assert sorted(history["eval"]) == ["docs", "docs/junk", "docs/python_code", "same"]
    n = len(history["eval_step"])
    assert all(len(v) == n for v in history["eval"].values())
    # The whole set's loss is the token-weighted mean of its domains': between the two, never equal to both.
    whole, code, junk = (np.array(history["eval"][k]) for k in ("docs", "docs/python_code", "docs/junk"))
    assert np.all(whole >= np.minimum(code, junk) - 1e-9) and np.all(whole <= np.maximum(code, junk) + 1e-9)
    assert not np.allclose(code, junk)


def test_static_scorer_fits_once_then_predicts_without_probes(static_run):
    rank0 = static_run[0]
    assert sorted(rank0["oracle"]) == [1]  # probes in the first scored round only
    first, later = rank0["records"][1], rank0["records"][2]
    assert first["probes"] == 16 and first["fit_round"] == 1
    assert "probes" not in later and later["fit_round"] == 1
    assert later["influence_spearman"] == first["influence_spearman"]
    assert rank0["influence_state"]["rounds_fitted"] == 1
    assert rank0["published"][2] != rank0["random_round"][2] and later["fallback"] is None


def test_static_scorer_resumes_to_the_same_selection(small_embedded, eval_sets, static_run, tmp_path):
    save = str(tmp_path / "ckpt")
    overrides = {"eval_sets": eval_sets, "selection": STATIC}
    first = run_on_ranks(_train, 2, small_embedded, {**overrides, "save": save, "exit_interval": EVERY + 1})[
        0
    ]
    resumed = run_on_ranks(_train, 2, small_embedded, {**overrides, "load": save})[0]
    full = static_run[0]
    assert first["served"] + resumed["served"] == full["served"]
    assert resumed["published"][2] == full["published"][2]
    assert resumed["history"]["eval"] == full["history"]["eval"]


def test_poor_fit_falls_back_to_the_random_draw(small_embedded):
    """No fit reaches a Spearman of 1.0 on 16 probes: every scored round is drawn at random, and says why."""
    (rank0, rank1) = run_on_ranks(
        _train, 2, small_embedded, {"selection": {"scorer_options": {"min_influence_spearman": 1.0}}}
    )
    assert rank0["published"] == rank1["published"]
    for r in (1, 2):
        assert rank0["published"][r] == rank0["random_round"][r]
        assert "below selection.scorer_options.min_influence_spearman=1.0" in rank0["records"][r]["fallback"]
        assert rank0["records"][r]["probes"] == 16  # the round was probed and fitted, then not used


def test_influence_fit_across_rounds_resumes_to_the_same_selection(small_embedded, tmp_path):
    """influence_rounds=2: round 2's influence model is fitted on round 1's probes too (read again from the
    pool), and a run resumed between the rounds (round 1's probes restored from the checkpoint) selects the
    same round 2."""
    smoothed = {"selection": {"scorer_options": {"influence_rounds": 2}}}
    full = run_on_ranks(_train, 2, small_embedded, smoothed)
    rank0 = full[0]
    assert rank0["published"] == full[1]["published"]
    assert rank0["records"][1]["fit_rounds"] == [1] and rank0["records"][1]["fit_pairs"] == 16
    assert rank0["records"][2]["fit_rounds"] == [1, 2] and rank0["records"][2]["fit_pairs"] == 32
    save = str(tmp_path / "ckpt")
    first = run_on_ranks(_train, 2, small_embedded, {**smoothed, "save": save, "exit_interval": EVERY + 1})[0]
    resumed = run_on_ranks(_train, 2, small_embedded, {**smoothed, "load": save})[0]
    assert first["served"] + resumed["served"] == rank0["served"]
    assert resumed["published"][2] == rank0["published"][2]
    assert resumed["records"][2]["fit_rounds"] == [1, 2]

"""The MATES round inside the training loop (TP=2, CPU): warm-up, probe -> fit -> score -> select on the
live model, per-round metrics to TensorBoard, and a run stopped in the middle of a round or right after a
round boundary resumes to exactly the selections, oracle scores and batches of the uninterrupted run."""

from __future__ import annotations

import numpy as np
import pytest

from mates_megatron.compat.spawn import run_on_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ITERS, EVERY = 9, 3  # rounds 0 (random warm-up), 1 and 2 (scored at the ends of steps 3 and 6)


def _train(data, overrides):
    overrides = dict(overrides)
    selection = overrides.pop("selection", {})
    worker_delay = overrides.pop("worker_delay", 0.0)
    flat_spelling = overrides.pop("flat_spelling", False)
    from mates_megatron.configio import build, merge
    from mates_megatron.selectors import RandomSelector
    from mates_megatron.training.build import build_trainer
    from mates_megatron.training.loop import TrainConfig

    cfg = {
        "data_prefix": data["prefix"],
        "reference": data["reference"],
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64},
        "parallel": {"tensor_model_parallel_size": 2, "cpu": True},
        "micro_batch_size": 2,
        "global_batch_size": 4,
        "train_iters": ITERS,
        "lr": 3e-3,
        "lr_warmup_iters": 1,
        "eval_interval": EVERY,
        "log_interval": 100,
        "seed": 5,
        "selection": {
            "pool": "indexed",
            "select_every": EVERY,
            "selection_ratio": 0.25,
            "selector": {"kind": "gumbel", "temperature": 0.5},
            "scorer": "mates",
            "seed": 11,
            "warmup_steps": EVERY,
            # The oracle's mechanics at toy size: each probe evaluates the whole reference set, which costs
            # several times the round's training (refused at the 0.1 default, as it should be at scale).
            "max_selection_cost": 50.0,
            "scorer_options": {
                "probe_samples": 16,
                "estimator": "oracle",
                # Read in the rank's own process (loader_workers 0): workers give the same batches bit for
                # bit (tests/distributed/test_influence_loader.py) and cost minutes to fork on 2 cores.
                "influence": {
                    "model": "ridge",
                    "ridge": {"features": "token_embeddings"},
                    "loader_workers": 0,
                },
                # The poor-fit guard off: 16 probes can fit below its default, and these tests are about the
                # rounds selecting by scores (tests/integration/test_evidence_round.py tests the guard).
                "min_influence_spearman": -1,
            },
        },
        **overrides,
    }
    cfg["selection"] = merge(cfg["selection"], selection)
    if (
        flat_spelling
    ):  # the spelling of earlier releases: the components' options among the selection's fields
        sel = cfg["selection"]
        selector = sel.pop("selector")
        sel.update(sel.pop("scorer_options"), selector=selector["kind"], temperature=selector["temperature"])
    trainer = build_trainer(build(TrainConfig, cfg, where="test"))
    (hook,) = trainer.hooks
    hook.scorer.influence.worker_delay = worker_delay
    served, published = [], {}
    order_fn, publish_fn = trainer.order.micro_batch_indices, hook.publish

    def record_served(consumed):
        batches = order_fn(consumed)
        served.append(np.concatenate(batches).tolist())
        return batches

    def record_published(round_, chosen):
        published[round_] = sorted(np.asarray(chosen).tolist())
        publish_fn(round_, chosen)

    trainer.order.micro_batch_indices = record_served
    hook.publish = record_published
    history = trainer.train()
    trainer.metrics_writer.close()
    k = hook.sampler.samples_per_round
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    return {
        "rerun_mode": get_rerun_state_machine().get_mode().value,
        "history": history,
        "served": served,
        "published": published,
        "records": hook.records,
        "oracle": {r: (o["ids"].tolist(), o["scores"].tolist()) for r, o in hook.scorer.oracle.items()},
        "influence_state": hook.scorer.influence.state_dict(),
        "workers": hook.scorer.influence.worker is not None,
        "random_round": {
            r: sorted(RandomSelector().select(hook.rounds.candidates(r), k, seed=11, round_=r).tolist())
            for r in range(ITERS // EVERY)
        },
    }


@pytest.fixture(scope="module")
def uninterrupted(small_embedded, tmp_path_factory):
    tb = tmp_path_factory.mktemp("tb")
    return run_on_ranks(_train, 2, small_embedded, {"metrics": {"tensorboard_dir": str(tb)}}), tb


def test_rounds_select_on_the_live_model_and_log_per_round(uninterrupted):
    (rank0, rank1), tb = uninterrupted
    # Both TP ranks serve and select the same data.
    assert rank0["served"] == rank1["served"] and rank0["published"] == rank1["published"]
    assert sorted(rank0["published"]) == [1, 2]  # round 0 is published when the hook is built
    assert sorted(rank0["records"]) == [1, 2]  # round 0 is the random warm-up
    # The warm-up round is the random selector's; scored rounds are not.
    served_0 = sorted(i for step in rank0["served"][:EVERY] for i in step)  # the fixture is shared: no writes
    assert served_0 == rank0["random_round"][0]
    for r in (1, 2):
        assert rank0["published"][r] != rank0["random_round"][r]
        rec = rank0["records"][r]
        assert rec["probes"] == 16 and rec["candidates"] == EVERY * 4 * 4
        assert np.isfinite([rec["oracle_mean"], rec["oracle_std"], rec["influence_spearman"]]).all()
        assert set(rec["seconds"]) == {"probe", "fit_and_score", "score", "stall", "select", "total"}
        assert abs(sum(rec["selected_share"].values()) - 1) < 1e-9
        ids, scores = rank0["oracle"][r]
        assert len(set(ids)) == 16 and rec["oracle_mean"] == pytest.approx(np.mean(scores))
    # Every served id of a round is one of that round's selection, none twice (round 0: the random draw).
    selections = {0: rank0["random_round"][0], **rank0["published"]}
    for r in range(3):
        ids = [i for step in rank0["served"][r * EVERY : (r + 1) * EVERY] for i in step]
        assert sorted(ids) == selections[r]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "eval/reference_loss", "mates/influence_spearman", "mates/oracle_std",
                "mates/seconds/probe", "mates/selected_share/python_docs"):  # fmt: skip
        assert tag in tags, tags
    spearman = [e.value for e in events.Scalars("mates/influence_spearman")]
    assert [e.step for e in events.Scalars("mates/influence_spearman")] == [EVERY, 2 * EVERY]
    assert spearman == pytest.approx([rank0["records"][r]["influence_spearman"] for r in (1, 2)])


@pytest.mark.parametrize("estimator", ["mirrored", "forward"])
def test_scored_rounds_at_dp2_with_the_distributed_optimizer_and_megatron_lm_checks(
    small_embedded, estimator
):
    """Megatron-LM's defaults around the probes: NaN checks in every gradient sync, each step inside the rerun
    state machine in validate_results mode, the distributed optimizer at DP=2 (replicas probe together); and
    Bridge's overlapped gradient reduce and parameter gather. The mirrored estimator: its reference step keeps
    the data-parallel sync, the path that reached the NaN check on any setting; the forward estimator: its
    direction is formed on each rank's Adam shard and gathered, and its moves start from parameters whose
    gather was deferred (the other estimators under the distributed optimizer and these checks:
    tests/distributed/test_probe.py)."""
    overrides = {
        "parallel": {"cpu": True},
        "use_distributed_optimizer": True,
        "overlap_grad_reduce": True,
        "overlap_param_gather": True,
        "check_for_nan_in_loss_and_grad": True,
        "rerun_mode": "validate_results",
        "selection": {"scorer_options": {"estimator": estimator}, "max_selection_cost": 200.0},
    }
    rank0, rank1 = run_on_ranks(_train, 2, small_embedded, overrides)
    assert sorted(rank0["records"]) == [1, 2]
    assert rank0["published"] == rank1["published"] and rank0["served"] != rank1["served"]
    for r in (1, 2):
        assert rank0["records"][r]["estimator"] == estimator
        assert np.isfinite([rank0["records"][r]["oracle_mean"], rank0["records"][r]["oracle_std"]]).all()
    assert rank0["rerun_mode"] == rank1["rerun_mode"] == "validate_results"  # given back after every round


def test_the_flat_spelling_of_earlier_releases_gives_the_same_run(small_embedded, uninterrupted):
    """The components' options at the top of the selection (probe_samples, estimator, influence, temperature,
    ...: read for one release, with a FutureWarning naming the new key) give the run of their sections, bit
    for bit."""
    (full, _), _ = uninterrupted
    flat = run_on_ranks(_train, 2, small_embedded, {"flat_spelling": True})[0]
    assert flat["published"] == {r: full["published"][r] for r in (1, 2)} and flat["served"] == full["served"]
    assert flat["oracle"] == full["oracle"] and flat["history"]["loss"] == full["history"]["loss"]


@pytest.mark.parametrize("stop", [EVERY, EVERY + 2], ids=["after-boundary", "mid-round"])
def test_resume_repeats_selections_and_batches(small_embedded, tmp_path, uninterrupted, stop):
    (full, _), _ = uninterrupted
    save = str(tmp_path / "ckpt")
    first = run_on_ranks(_train, 2, small_embedded, {"save": save, "exit_interval": stop})[0]
    resumed = run_on_ranks(_train, 2, small_embedded, {"load": save})[0]
    assert first["served"] + resumed["served"] == full["served"]
    # Round 2 is selected after the restart: on the restored model, optimizer, RNG and influence state.
    assert resumed["published"][2] == full["published"][2]
    assert resumed["oracle"][2] == full["oracle"][2]
    assert resumed["records"][1]["influence_spearman"] == full["records"][1]["influence_spearman"]
    assert resumed["history"]["loss"] == full["history"]["loss"]
    assert resumed["history"]["reference_loss"] == full["history"]["reference_loss"]


def test_checkpoint_holds_the_influence_model_when_rank_0_fits_none(small_embedded, tmp_path):
    """Rank 0 writes the run state; with influence_ranks=[1] the fitted head lives on rank 1 only, and the
    checkpoint must carry that one."""
    import torch

    save = tmp_path / "ckpt"
    overrides = {"save": str(save), "exit_interval": EVERY, "selection": {"influence_ranks": [1]}}
    ranks = run_on_ranks(_train, 2, small_embedded, overrides)
    assert ranks[0]["influence_state"]["model"] is None  # rank 0 fits no influence model
    held = ranks[1]["influence_state"]["model"]
    assert held and ranks[1]["influence_state"]["rounds_fitted"] == 1
    run_state = torch.load(save / f"iter_{EVERY:07d}" / "run_state.pt", weights_only=False)
    saved = run_state["extra"]["hooks"][0]["scorer"]["influence"]
    assert saved["rounds_fitted"] == 1 and saved["model"].keys() == held.keys()
    assert all(torch.equal(saved["model"][k], held[k]) for k in held)


# Round r is probed at the end of step 3r - 1 and published at the end of 3r. The encoder reads the pool's
# token ids (the embedded data is tokenised with MiniLM's vocabulary), in this process and in the workers.
LEAD = {"probe_lead_steps": 1, "scorer_options": {"influence": {"pass_token_ids": True}}}


@pytest.fixture(scope="module")
def probed_ahead(small_embedded):
    return run_on_ranks(_train, 2, small_embedded, {"selection": LEAD})


def test_asynchronous_rounds_select_what_synchronous_rounds_select(
    small_embedded, probed_ahead, uninterrupted
):
    """The influence stage in side processes (one per influence rank, with their own gloo world), each
    sleeping 4 s before its fit: training goes on for the lead step, then waits; the selections, probes,
    influence model, batches and losses are the synchronous run's, bit for bit."""
    sync = probed_ahead[0]
    slow = run_on_ranks(
        _train, 2, small_embedded, {"selection": {**LEAD, "asynchronous": True}, "worker_delay": 4.0}
    )
    assert slow[0]["workers"] and not sync["workers"]
    assert slow[0]["published"] == slow[1]["published"] == sync["published"]
    assert slow[0]["served"] == sync["served"]
    assert slow[0]["oracle"] == sync["oracle"]
    assert slow[0]["history"]["loss"] == sync["history"]["loss"]
    for r in (1, 2):
        assert slow[0]["records"][r]["influence_spearman"] == sync["records"][r]["influence_spearman"]
        # Training waited for the slow workers, and logged it.
        assert slow[0]["records"][r]["seconds"]["stall"] > 1.0
        assert sync["records"][r]["seconds"]["stall"] < 0.5
    held, ref = slow[0]["influence_state"]["model"], sync["influence_state"]["model"]
    assert held.keys() == ref.keys() and all((held[k] == ref[k]).all() for k in ref)
    # Probing one step ahead selects on a model one step older than at the boundary: another selection.
    (full, _), _ = uninterrupted
    assert sync["published"][2] != full["published"][2]


def test_asynchronous_resume_between_probe_and_publish(small_embedded, probed_ahead, tmp_path):
    """Stopped at step 5 (round 2 probed, its influence stage in flight): the checkpoint waits for it and
    saves the selection, and the resumed run publishes it at step 6 and trains exactly as without a stop."""
    save = str(tmp_path / "ckpt")
    sel = {"selection": {**LEAD, "asynchronous": True}}
    first = run_on_ranks(_train, 2, small_embedded, {**sel, "save": save, "exit_interval": 5})[0]
    resumed = run_on_ranks(_train, 2, small_embedded, {**sel, "load": save})[0]
    sync = probed_ahead[0]
    assert first["served"] + resumed["served"] == sync["served"]
    assert resumed["published"] == {2: sync["published"][2]}  # published from the checkpoint, not redone
    assert resumed["oracle"] == sync["oracle"]
    assert resumed["history"]["loss"] == sync["history"]["loss"]

"""A checkpoint saved with one TP/PP/DP layout resumes in another (megatron-core dist_checkpointing).

Each case: a run on 2 real processes (TP=2, PP=2 or DP=2; DP=2 also with the distributed optimizer) trains
K + M steps and saves at step K; a run on 1 process (TP=PP=DP=1) resumes from that step-K checkpoint. Right
after the load its full weights are exactly the 2-process run's weights at step K and Adam's step is K; its
next M training losses equal the uninterrupted run's within LOSS_TOL. The distributed optimizer's checkpoint
reshards over DP only: a TP/PP change is refused with an error, and at the same layout (PP=2, where the
gradient buffer of each stage has two buckets) the resume is bit-identical.

To keep the wall time down, three spawns serve every case: the 2-process spawn runs the saving runs one
after the other (the process group stays, megatron-core's model-parallel state is rebuilt for each layout),
the 1-process spawn resumes the checkpoints one after the other, and one more 2-process spawn resumes the
distributed-optimizer run at its own layout.
"""

from __future__ import annotations

import logging

import pytest
import torch

from mates_megatron.compat.spawn import run_on_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

K, M = 3, 3
LOSS_TOL = 1e-5
DIST_OPT = {"use_distributed_optimizer": True}
# case -> (TP, PP, TrainConfig overrides) of the saving run on 2 processes (DP is what is left); each case
# resumes at TP=PP=DP=1.
CASES = {
    "tp2-to-tp1": (2, 1, {}),
    "pp2-to-pp1": (1, 2, {}),
    "dp2-to-dp1": (1, 1, {}),
    "dp2-to-dp1-distopt": (1, 1, DIST_OPT),
}
# Saved as well: the distributed optimizer at PP=2 (refused at PP=1, resumed at PP=2).
SAVES = {**CASES, "pp2-distopt": (1, 2, DIST_OPT)}


def _config(data, tp, pp, *, extra_vocab: int = 0, **overrides):
    from mates_megatron.training.data import TokenizerInfo
    from mates_megatron.training.loop import TrainConfig
    from mates_megatron.training.model import GPTConfig
    from mates_megatron.training.parallel import ParallelConfig

    # The padded vocabulary is a multiple of make_vocab_size_divisible_by x TP: a vocabulary that is a
    # multiple of 256 pads the same at TP=1 and TP=2, so the softmax runs over the same rows in both
    # layouts (padded rows take part in it) and the losses can match.
    vocab = -(-TokenizerInfo.from_meta(data["prefix"]).vocab_size // 256) * 256
    # Dropout 0: the resumed run in another layout cannot restore the saved per-rank RNG streams (and the
    # masks drawn per TP rank differ between layouts anyway); without dropout the losses depend only on
    # the weights, the optimizer state and the data.
    model = GPTConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        seq_length=64,
        vocab_size=vocab + extra_vocab,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    cfg = {
        "data_prefix": data["prefix"],
        "model": model,
        "parallel": ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, cpu=True),
        "micro_batch_size": 2,
        "global_batch_size": 8,
        "train_iters": K + M,
        "lr": 3e-3,
        "lr_warmup_iters": 2,
        "log_interval": 100,
        "seed": 5,
    }
    cfg.update(overrides)
    return TrainConfig(**cfg)


def _full_weights(trainer) -> dict[str, torch.Tensor]:
    """This rank's share of the full (TP-gathered) weights, by their names in the TP=1/PP=1 model."""
    from mates_megatron.training.sharding import gather_tp

    module = trainer.model_chunks[0].module
    params = {k: p.detach() for k, p in module.named_parameters()}
    return {k: v.clone() for k, v in gather_tp(module, params).items()}


class _WeightsAt:
    """Records the full weights at the end of one step (a TrainerHook; it has no state to save)."""

    def __init__(self, step: int) -> None:
        self.step, self.weights = step, None

    def on_step_end(self, trainer, iteration, metrics) -> None:
        if iteration == self.step:
            self.weights = _full_weights(trainer)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _adam_steps(optimizer) -> set[float]:
    """Every "step" torch Adam keeps (one per parameter: the one its bias correction uses)."""
    from mates_megatron.runtime.optimizers import megatron_optimizers

    return {float(st["step"]) for o in megatron_optimizers(optimizer) for st in o.optimizer.state.values()}


def _fresh_parallel_state() -> None:
    # Several Trainers in one process: each builds megatron-core's model-parallel state for its layout.
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def _save_all(data, root):
    """On 2 ranks, for each case: K + M steps, checkpoints at K (and at the end); the weights at step K."""
    from mates_megatron.training.loop import Trainer

    out = {}
    for name, (tp, pp, overrides) in SAVES.items():
        _fresh_parallel_state()
        hook = _WeightsAt(K)
        cfg = _config(data, tp, pp, save=f"{root}/{name}", save_interval=K, **overrides)
        history = Trainer(cfg, hooks=[hook]).train()
        out[name] = (history["loss"], hook.weights)
    return out


def _resume_all(data, root):
    """On 1 rank (TP=PP=DP=1), for each case: weights and Adam steps right after the load, then M steps."""
    from mates_megatron.training.loop import Trainer

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("mates_megatron.checkpoint").addHandler(handler)
    out = {}
    for name, (_, _, overrides) in CASES.items():
        _fresh_parallel_state()
        records.clear()
        trainer = Trainer(_config(data, 1, 1, load=f"{root}/{name}", **overrides), hooks=[_WeightsAt(-1)])
        loaded, steps = _full_weights(trainer), _adam_steps(trainer.optimizer)
        history = trainer.train()
        out[name] = {
            "weights": loaded,
            "adam_steps": steps,
            "adam_steps_end": _adam_steps(trainer.optimizer),
            "history": history,
            "log": list(records),
        }
    # One more vocabulary entry pads to 128 more rows at TP=1: the load zero-fills them, and says so.
    _fresh_parallel_state()
    records.clear()
    Trainer(_config(data, 1, 1, load=f"{root}/tp2-to-tp1", extra_vocab=1), hooks=[_WeightsAt(-1)])
    out["padded-vocab-log"] = list(records)
    # The distributed optimizer's checkpoint does not reshard over PP: refused before anything is loaded.
    _fresh_parallel_state()
    try:
        Trainer(_config(data, 1, 1, load=f"{root}/pp2-distopt", **DIST_OPT))
    except ValueError as e:
        out["pp2-distopt-refusal"] = str(e)
    return out


def _resume_same_layout(data, root):
    """On 2 ranks at the saved layout (PP=2, distributed optimizer): weights after the load, then M steps."""
    from mates_megatron.training.loop import Trainer

    trainer = Trainer(_config(data, 1, 2, load=f"{root}/pp2-distopt", **DIST_OPT), hooks=[_WeightsAt(-1)])
    loaded, steps = _full_weights(trainer), _adam_steps(trainer.optimizer)
    return {"weights": loaded, "adam_steps": steps, "history": trainer.train()}


def _merge(parts: list[dict]) -> dict[str, torch.Tensor]:
    """Full weights from every rank's share (TP ranks hold the same gathered tensors; PP stages differ)."""
    full: dict[str, torch.Tensor] = {}
    for part in parts:
        for k, v in part.items():
            if k in full:
                torch.testing.assert_close(v, full[k], rtol=0, atol=0, msg=k)
            full[k] = v
    return full


@pytest.fixture(scope="module")
def runs(small_embedded, tmp_path_factory):
    from mates_megatron.training.checkpoint import TRACKER

    root = tmp_path_factory.mktemp("reshard")
    saved = run_on_ranks(_save_all, 2, small_embedded, str(root))
    for name in SAVES:
        # The runs also saved at their last step; resume from step K (the tracker names the iteration).
        (root / name / TRACKER).write_text(str(K))
    [resumed] = run_on_ranks(_resume_all, 1, small_embedded, str(root))
    resumed["pp2-distopt"] = run_on_ranks(_resume_same_layout, 2, small_embedded, str(root))
    return saved, resumed


@pytest.mark.parametrize("case", list(CASES))
def test_resume_in_another_layout(runs, case):
    saved_ranks, resumed_all = runs
    full_losses = saved_ranks[-1][case][0]
    saved = _merge([r[case][1] for r in saved_ranks])
    resumed = resumed_all[case]

    # The tied output layer of the last pipeline stage is a copy of the word embeddings; PP=1 has none.
    out = saved.pop("output_layer.weight", None)
    if out is not None:
        torch.testing.assert_close(out, saved["embedding.word_embeddings.weight"], rtol=0, atol=0)
    assert resumed["weights"].keys() == saved.keys()
    for k, v in saved.items():
        # The load moves bytes, it computes nothing: the weights are exactly the saved ones.
        torch.testing.assert_close(resumed["weights"][k], v, rtol=0, atol=0, msg=k)
    # Adam's step (per parameter in torch's Adam, the fallback without apex/TE) survives the reshard, and
    # each parameter's advances once per step afterwards.
    assert resumed["adam_steps"] == {float(K)}
    assert resumed["adam_steps_end"] == {float(K + M)}
    history = resumed["history"]
    assert history["step"] == list(range(1, K + M + 1))
    torch.testing.assert_close(
        torch.tensor(history["loss"][K:]), torch.tensor(full_losses[K:]), rtol=0, atol=LOSS_TOL
    )
    # The steps before the checkpoint come from the saved history, so they are the saved run's own.
    assert history["loss"][:K] == full_losses[:K]
    # The layout changed: the per-rank RNG states are not loaded, and the log says so.
    assert any("RNG states cannot map" in m and "were NOT loaded" in m for m in resumed["log"])


def test_distributed_optimizer_refuses_a_pipeline_change(runs):
    message = runs[1].get("pp2-distopt-refusal", "")
    assert "saved with the distributed optimizer at TP=1, PP=2; this run has TP=1, PP=1" in message
    assert "reshards over data parallelism only" in message


def test_distributed_optimizer_resumes_bit_identically_at_its_layout(runs):
    saved_ranks, resumed_all = runs
    full_losses = saved_ranks[-1]["pp2-distopt"][0]
    saved = _merge([r["pp2-distopt"][1] for r in saved_ranks])
    resumed = resumed_all["pp2-distopt"]
    loaded = _merge([r["weights"] for r in resumed])
    assert loaded.keys() == saved.keys()
    for k, v in saved.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, msg=k)
    assert all(r["adam_steps"] == {float(K)} for r in resumed)
    # Same layout, RNG restored: the losses after the restart are exactly the uninterrupted run's.
    assert resumed[-1]["history"]["loss"] == full_losses


def test_a_changed_padded_vocabulary_is_logged(runs):
    log = runs[1]["padded-vocab-log"]
    assert any(
        "embedding.word_embeddings.weight was saved with shape" in m and "zero-filled or dropped" in m
        for m in log
    ), log


# -- errors that name the directory and the fix (no processes needed: they are raised before any collective)


def _load(load_dir, **kw):
    from mates_megatron.training.checkpoint import load_checkpoint

    return load_checkpoint(load_dir, model_chunks=None, optimizer=None, scheduler=None, **kw)


def test_old_format_is_refused_by_name(tmp_path):
    from mates_megatron.training.checkpoint import TRACKER

    shard = tmp_path / "iter_0000005" / "mp_rank_00_000"
    shard.mkdir(parents=True)
    torch.save({}, shard / "model_optim_rng.pt")
    (tmp_path / TRACKER).write_text("5")
    with pytest.raises(ValueError, match=r"iter_0000005 was written by the old per-shard checkpoint format"):
        _load(tmp_path, use_distributed_optimizer=False)


def test_missing_iteration_and_empty_directory(tmp_path):
    from mates_megatron.training.checkpoint import TRACKER

    assert _load(tmp_path, use_distributed_optimizer=False) is None
    (tmp_path / TRACKER).write_text("7")
    with pytest.raises(FileNotFoundError, match=r"iter_0000007 not found.*fix the tracker file"):
        _load(tmp_path, use_distributed_optimizer=False)


def test_distributed_optimizer_switch_is_refused(tmp_path):
    from mates_megatron.training.checkpoint import FORMAT, RUN_STATE, TRACKER

    it_dir = tmp_path / "iter_0000004"
    it_dir.mkdir()
    run_state = {"format": FORMAT, "use_distributed_optimizer": True, "layout": {"tp": 1, "pp": 1, "dp": 2}}
    torch.save(run_state, it_dir / RUN_STATE)
    (tmp_path / TRACKER).write_text("4")
    with pytest.raises(ValueError, match=r"iter_0000004 was saved with use_distributed_optimizer=True"):
        _load(tmp_path, use_distributed_optimizer=False)

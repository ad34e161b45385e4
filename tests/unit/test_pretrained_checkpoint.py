"""TrainConfig.pretrained_checkpoint: a new run starts from a saved run's weights, and from nothing else of it.

Megatron-LM's --pretrained-checkpoint with --finetune, on the project's own loop (CPU, gloo): the weights are
bitwise the saved ones (also at TP=2 from a TP=1 checkpoint), the optimizer, scheduler and iteration start
fresh; a checkpoint in `load` wins over it (a restarted run continues exactly); a directory without a
checkpoint is an error that names it.
"""

from __future__ import annotations

import pytest
import torch

from mates_megatron.compat.spawn import run_on_ranks

pytestmark = pytest.mark.distributed

SAVED_ITERS = 3


def _config(data, tp: int = 1, bf16: bool = False, **overrides):
    from mates_megatron.training.data import TokenizerInfo
    from mates_megatron.training.loop import TrainConfig
    from mates_megatron.training.model import GPTConfig
    from mates_megatron.training.parallel import ParallelConfig

    # A vocabulary that is a multiple of 256 pads alike at TP=1 and TP=2 (padded to 128 x TP).
    vocab = -(-TokenizerInfo.from_meta(data["prefix"]).vocab_size // 256) * 256
    cfg = {
        "data_prefix": data["prefix"],
        "model": GPTConfig(
            num_layers=2, hidden_size=32, num_attention_heads=2, seq_length=32, vocab_size=vocab, bf16=bf16
        ),
        "parallel": ParallelConfig(tensor_model_parallel_size=tp, cpu=True),
        "micro_batch_size": 2,
        "global_batch_size": 4,
        "train_iters": SAVED_ITERS,
        "lr": 3e-3,
        "lr_warmup_iters": 1,
        "log_interval": 100,
        "seed": 5,
    }
    cfg.update(overrides)
    return TrainConfig(**cfg)


def _full_weights(trainer) -> dict[str, torch.Tensor]:
    """The full (TP-gathered) weights, by their names in the TP=1 model."""
    from megatron.core.transformer.module import Float16Module

    from mates_megatron.training.sharding import gather_tp

    module = trainer.model_chunks[0].module
    if isinstance(module, Float16Module):  # bf16: DDP(Float16Module(GPTModel)), as Megatron-LM builds it
        module = module.module
    params = {k: p.detach() for k, p in module.named_parameters()}
    return {k: v.clone() for k, v in gather_tp(module, params).items()}


def _adam_steps(optimizer) -> set[float]:
    from mates_megatron.runtime.optimizers import megatron_optimizers

    return {float(st["step"]) for o in megatron_optimizers(optimizer) for st in o.optimizer.state.values()}


def _state(trainer) -> dict:
    return {
        "weights": _full_weights(trainer),
        "adam_steps": _adam_steps(trainer.optimizer),
        "adam_state": sum(len(o.optimizer.state) for o in _optimizers(trainer)),
        "scheduler_steps": trainer.scheduler.num_steps,
        "iteration": trainer.iteration,
        "consumed_samples": trainer.consumed_samples,
        "history_steps": list(trainer.history["step"]),
    }


def _optimizers(trainer) -> list:
    from mates_megatron.runtime.optimizers import megatron_optimizers

    return megatron_optimizers(trainer.optimizer)


def _runs(data, root: str) -> dict:
    """One process, TP=1, one Trainer after the other (megatron-core's parallel state rebuilt for each)."""
    from megatron.core import parallel_state

    from mates_megatron.training.loop import Trainer

    def trainer(**overrides) -> Trainer:
        parallel_state.destroy_model_parallel()
        return Trainer(_config(data, **overrides))

    out: dict = {}
    src, new, empty = f"{root}/pretrained", f"{root}/continued", f"{root}/empty"
    saved = trainer(save=src)
    out["fresh_weights"] = _full_weights(saved)
    saved.train()
    out["saved"] = _state(saved)

    # First launch of a continued-training run: `load` (= `save`) has no checkpoint yet.
    started = trainer(load=new, save=new, pretrained_checkpoint=src, train_iters=4, exit_interval=1)
    out["started"] = _state(started)
    started.train()
    out["started_after_one_step"] = _state(started)

    # Its restart: the checkpoint in `load` wins, the pretrained one is not read.
    restarted = trainer(load=new, save=new, pretrained_checkpoint=src, train_iters=4)
    out["restarted"] = _state(restarted)
    # Not even looked at: an empty pretrained_checkpoint would raise if it were.
    out["restarted_past_empty"] = _state(trainer(load=src, pretrained_checkpoint=empty))

    # bf16 keeps fp32 main copies of the weights in the optimizer: they must be the loaded weights, or the
    # first step would update the initial ones.
    bf16 = trainer(pretrained_checkpoint=src, bf16=True)
    [opt] = _optimizers(bf16)
    model_data, main_data = opt._get_model_and_main_params_data_float16()
    out["bf16_main_is_model"] = len(main_data) > 0 and all(
        torch.equal(main, model.float()) for model, main in zip(model_data, main_data, strict=True)
    )
    out["bf16_weights"] = _full_weights(bf16)

    try:
        trainer(pretrained_checkpoint=empty)
    except FileNotFoundError as e:
        out["empty_error"] = str(e)
    return out


def _tp2_start(data, src: str) -> dict:
    from mates_megatron.training.loop import Trainer

    trainer = Trainer(_config(data, tp=2, pretrained_checkpoint=src))
    return _state(trainer)


@pytest.fixture(scope="module")
def runs(small_embedded, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    (root / "empty").mkdir()
    [out] = run_on_ranks(_runs, 1, small_embedded, str(root))
    out["root"] = root
    return out


def _assert_bitwise(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(actual[k], v, rtol=0, atol=0, msg=k)


def test_a_run_starts_from_the_pretrained_weights_and_nothing_else(runs):
    saved, started = runs["saved"], runs["started"]
    assert saved["iteration"] == SAVED_ITERS and saved["adam_steps"] == {float(SAVED_ITERS)}
    # The saved run trained: its weights are not the initial ones (so the comparison below means something).
    assert any(not torch.equal(v, runs["fresh_weights"][k]) for k, v in saved["weights"].items())

    _assert_bitwise(started["weights"], saved["weights"])
    # Everything else starts fresh: no Adam state, scheduler at 0, iteration 0, no samples consumed.
    assert started["adam_state"] == 0 and started["adam_steps"] == set()
    assert started["scheduler_steps"] == 0
    assert (started["iteration"], started["consumed_samples"], started["history_steps"]) == (0, 0, [])
    # Its first step is step 1 of a new run, Adam's first.
    after = runs["started_after_one_step"]
    assert after["iteration"] == 1 and after["history_steps"] == [1] and after["adam_steps"] == {1.0}


def test_bf16_main_weights_follow_the_pretrained_weights(runs):
    assert runs["bf16_main_is_model"]
    # The fp32 checkpoint loads into the bf16 model: the saved weights, to bf16 precision.
    saved = runs["saved"]["weights"]
    assert runs["bf16_weights"].keys() == saved.keys()
    for k, v in saved.items():
        torch.testing.assert_close(runs["bf16_weights"][k].float(), v, rtol=1e-2, atol=1e-3, msg=k)


def test_a_checkpoint_in_load_wins_over_the_pretrained_one(runs):
    restarted = runs["restarted"]
    # The continued run's own checkpoint at step 1, not the pretrained run's step 3 nor a fresh start.
    assert (restarted["iteration"], restarted["history_steps"], restarted["adam_steps"]) == (1, [1], {1.0})
    _assert_bitwise(restarted["weights"], runs["started_after_one_step"]["weights"])
    past_empty = runs["restarted_past_empty"]
    assert past_empty["iteration"] == SAVED_ITERS and past_empty["adam_steps"] == {float(SAVED_ITERS)}
    _assert_bitwise(past_empty["weights"], runs["saved"]["weights"])


def test_an_empty_pretrained_checkpoint_is_an_error_naming_it(runs):
    message = runs.get("empty_error", "")
    empty = str(runs["root"] / "empty")
    assert f"pretrained_checkpoint {empty} holds no checkpoint" in message, message
    assert "latest_checkpointed_iteration.txt" in message


def test_tp2_starts_from_a_tp1_checkpoint(runs, small_embedded):
    ranks = run_on_ranks(_tp2_start, 2, small_embedded, str(runs["root"] / "pretrained"))
    for r in ranks:
        # gather_tp gives each TP rank the full tensors: each must equal the TP=1 run's weights.
        _assert_bitwise(r["weights"], runs["saved"]["weights"])
        assert r["iteration"] == 0 and r["adam_state"] == 0

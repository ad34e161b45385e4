"""Megatron-Bridge integration: MatesCallback on Bridge's real callback classes (Callback, CallbackManager,
CallbackContext of megatron.bridge.training.callbacks), fired in the order Bridge 0.3.1's ``train()`` fires them,
over a real megatron-core GPT, optimizer and scheduler on CPU (gloo), with Bridge's RerunDataIterator around
the MATES train iterator as Bridge wraps an 'external' loader."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from types import SimpleNamespace

import pytest
import torch


def _bridge_callbacks():
    """Bridge's callbacks module. Bridge 0.3.1's package __init__ imports AutoBridge -> peft -> transformer_engine
    (CUDA only), though the callbacks module imports nothing of it: on a machine without transformer-engine
    the module is loaded from the installed package with that __init__ left out."""
    try:
        return importlib.import_module("megatron.bridge.training.callbacks")
    except ModuleNotFoundError as e:
        if e.name != "transformer_engine":
            return None
    spec = importlib.util.find_spec("megatron.bridge")
    pkg = types.ModuleType("megatron.bridge")
    pkg.__path__, pkg.__spec__ = list(spec.submodule_search_locations), spec
    sys.modules["megatron.bridge"] = pkg
    return importlib.import_module("megatron.bridge.training.callbacks")


bcb = _bridge_callbacks()
pytestmark = pytest.mark.skipif(
    bcb is None, reason="megatron.bridge is not installed (pip install 'mates-megatron[bridge]')"
)

from mates_megatron.config import SelectionConfig  # noqa: E402
from mates_megatron.integrations import megatron_bridge as mb  # noqa: E402


def bridge_state(tmp, **train) -> SimpleNamespace:
    """The fields of Bridge's GlobalState that the callback reads (GlobalState itself imports Bridge's package)."""
    cfg = SimpleNamespace(
        train=SimpleNamespace(**{"train_iters": 6, "train_samples": None, "global_batch_size": 4,
                                 "micro_batch_size": 2, "exit_interval": None, "exit_signal_handler": False,
                                 "exit_duration_in_mins": None, "iterations_to_skip": [], **train}),
        checkpoint=SimpleNamespace(save=str(tmp), load=None, save_interval=2, non_persistent_save_interval=None),
        dataset=SimpleNamespace(dataloader_type="external", num_workers=0, pin_memory=False),
        model=SimpleNamespace(seq_length=64),
        optimizer=SimpleNamespace(use_distributed_optimizer=False),
    )  # fmt: skip
    return SimpleNamespace(cfg=cfg, train_state=SimpleNamespace(step=0, consumed_train_samples=0),
                           signal_handler=None, start_time=0.0, tensorboard_logger=None, wandb_logger=None)  # fmt: skip


class HostReads(torch.Tensor):
    """A loss value that records every call that copies it to the host: on a GPU each is a device sync, which
    stalls the step's queued work (CPU tensors run the same calls, so the count is the GPU's)."""

    READS = frozenset(
        {"__float__", "__int__", "__bool__", "__index__", "item", "cpu", "tolist", "numpy", "to"}
    )
    calls: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in cls.READS:
            cls.calls.append(func.__name__)
        return super().__torch_function__(func, types, args, kwargs or {})


def _bridge_run(data: dict, save_dir: str) -> dict:
    """One rank: a scored round probed one step ahead (select_every 3, steps 1-6), checkpoints every 2 steps,
    fired as Bridge's train() fires its events; then a resume at step 4 from the saved state."""
    from megatron.core.rerun_state_machine import RerunDataIterator

    from mates_megatron.configio import build
    from mates_megatron.data.tokenizer import load_tokenizer
    from mates_megatron.plugin import pool_num_samples
    from mates_megatron.training.config import TrainConfig
    from mates_megatron.training.loop import Trainer

    cfg = build(TrainConfig, {
        "data_prefix": data["prefix"], "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
        "seq_length": 64}, "parallel": {"cpu": True}, "micro_batch_size": 2, "global_batch_size": 4,
        "train_iters": 6, "lr": 3e-3, "lr_warmup_iters": 1, "seed": 5,
    }, where="test")  # fmt: skip
    trainer = Trainer(cfg)  # the model, optimizer and scheduler Bridge's setup would build
    sel = SelectionConfig(
        select_every=3, selection_ratio=0.25, selector="gumbel", scorer="mates", seed=11, warmup_steps=3,
        probe_lead_steps=1,
        scorer_options={"probe_samples": 12, "estimator": "oracle",
                        "influence": {"model": "ridge", "ridge": {"features": "token_embeddings"}}},
    )  # fmt: skip
    tok = load_tokenizer(trainer.tokenizer_info.path)
    pool = trainer.build_dataset(pool_num_samples(sel, train_iters=6, global_batch_size=4))
    events: list[str] = []
    loss_reads: dict[int, list[str]] = {}  # iteration -> the callback's host reads of Bridge's loss dict

    def run(start: int, load: str | None) -> tuple[mb.MatesCallback, dict[int, list]]:
        cb = mb.MatesCallback(sel, reference=data["reference"], tokenizer=tok, device=torch.device("cpu"))
        it = RerunDataIterator(cb.provide(pool)[0])  # what Bridge's setup makes of an 'external' loader
        manager = bcb.normalize_callbacks([cb])
        manager.register(
            "on_train_step_end", lambda ctx: events.append(f"end {ctx.state.train_state.step + 1}")
        )
        gs = bridge_state(save_dir)
        gs.cfg.checkpoint.load = load
        gs.train_state.step, gs.train_state.consumed_train_samples = start, start * 4
        live = {"model": trainer.model_chunks, "optimizer": trainer.optimizer, "scheduler": trainer.scheduler}

        def ctx(**kw):
            return bcb.CallbackContext(state=gs, user_state=manager.user_state, **live, **kw)

        manager.fire("on_train_start", ctx())
        served = {}
        while gs.train_state.step < 6:  # Bridge's loop
            served[gs.train_state.step + 1] = [next(it)["tokens"] for _ in range(2)]
            HostReads.calls = []
            loss = {"lm loss": torch.tensor(1.0).as_subclass(HostReads)}  # train_step's reduced losses
            manager.fire("on_train_step_end", ctx(loss_dict=loss, skipped_iter=False))
            loss_reads[gs.train_state.step + 1] = HostReads.calls
            gs.train_state.step += 1
            gs.train_state.consumed_train_samples += 4
        manager.fire("on_train_end", ctx())
        return cb, served

    before = [p.detach().clone() for p in trainer.model_chunks[0].parameters()]
    cb, served = run(0, None)
    after = list(trainer.model_chunks[0].parameters())
    saved2 = torch.load(f"{save_dir}/iter_0000002/mates_state.pt", weights_only=False)
    saved6 = torch.load(f"{save_dir}/iter_0000006/mates_state.pt", weights_only=False)
    _, resumed = run(4, save_dir)
    return {
        "events": events[:6],
        "saved": cb.saved,
        "chosen_at_2": sorted(
            _rows(torch.stack([torch.as_tensor(pool[int(i)]["tokens"]) for i in saved2["hook"]["chosen"][1]]))
        ),  # fmt: skip
        "records": sorted(saved6["hook"]["records"]),
        "probes": saved6["hook"]["records"][1]["probes"],
        "unchanged": all(torch.equal(a, b) for a, b in zip(before, after, strict=True)),
        "served_round1": sorted(r for s in (4, 5, 6) for b in served[s] for r in _rows(b)),
        "resumed_equal": all(
            torch.equal(a, b) for s in (5, 6) for a, b in zip(served[s], resumed[s], strict=True)
        ),
        "state_cleared": mlm_state_is_clear(),
        "loss_reads": loss_reads,
    }


def _rows(tokens: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(int(t) for t in row) for row in tokens]


def mlm_state_is_clear() -> bool:
    from mates_megatron.integrations.megatron_lm import state

    return state._STATE is None


@pytest.mark.distributed
def test_the_round_runs_saves_settled_and_resumes_through_bridge_events(small_embedded, tmp_path):
    from mates_megatron.compat.spawn import run_on_ranks

    (r,) = run_on_ranks(_bridge_run, 1, small_embedded, str(tmp_path))
    assert r["events"] == [f"end {i}" for i in range(1, 7)]  # iteration = Bridge's step + 1
    assert r["saved"] == [2, 4, 6, 6]  # save_interval 2, then the final save of pretrain()
    assert r["records"] == [1] and r["probes"] == 12  # one scored round, at the boundary of step 3
    # Probed at step 2, saved at step 2: the save waited for the round (settle) and holds its selection,
    # which is what steps 4-6 were served.
    assert r["chosen_at_2"] == r["served_round1"] and len(r["served_round1"]) == 12
    assert r["unchanged"]  # the round left the live model as it found it
    assert r["resumed_equal"]  # resumed at step 4 from the state beside the checkpoint: the same batches
    assert r["state_cleared"]
    # No device sync on Bridge's loss values on any step: off round boundaries (1, 4, 5), where a round is
    # probed (2) or published (3, 6); the round reads the live model, never the loss dict.
    assert r["loss_reads"] == {i: [] for i in range(1, 7)}


def test_the_callback_registers_on_bridges_events():
    cb = mb.MatesCallback(SelectionConfig())
    assert isinstance(cb, bcb.Callback)
    manager = bcb.normalize_callbacks([cb])
    fired = {e for e in bcb.VALID_EVENTS if bcb.should_fire(manager, e)}
    assert fired == {"on_train_start", "on_train_step_end", "on_train_end"}


def test_bridge_saves_at_follows_checkpoint_and_decide_exit(tmp_path):
    gs = bridge_state(tmp_path, exit_interval=5)
    cpu = torch.device("cpu")
    assert [i for i in range(1, 11) if mb.bridge_saves_at(gs, i, cpu)] == [2, 4, 5, 6, 8, 10]
    gs.cfg.train.exit_signal_handler = True
    gs.signal_handler = SimpleNamespace(signals_received=lambda: [True])
    assert mb.bridge_saves_at(gs, 3, cpu)
    gs.cfg.checkpoint.save = None
    assert not mb.bridge_saves_at(gs, 2, cpu)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: setattr(c.dataset, "dataloader_type", "single"),
            "callback.dataset_provider(config.dataset)",
        ),
        (lambda c: setattr(c.train, "train_samples", 100), "train.train_iters must be set"),
        (lambda c: setattr(c.train, "rampup_batch_size", [2, 2, 8]), "drop it"),
        (lambda c: setattr(c.train, "iterations_to_skip", [3]), "never be published"),
        (lambda c: setattr(c.checkpoint, "non_persistent_save_interval", 5), "use checkpoint.save_interval"),
    ],
)
def test_misconfigured_bridge_runs_are_refused_with_the_fix(tmp_path, change, message):
    gs = bridge_state(tmp_path)
    change(gs.cfg)
    cb = mb.MatesCallback(SelectionConfig())
    cb.provide(None)
    with pytest.raises(
        ValueError, match="MatesCallback: .*" + message.replace("(", r"\(").replace(")", r"\)")
    ):
        bcb.normalize_callbacks([cb]).fire("on_train_start", bcb.CallbackContext(state=gs, model=[]))


def test_without_the_provider_or_the_callback_the_error_says_what_to_wire(tmp_path):
    cb = mb.MatesCallback(SelectionConfig())
    with pytest.raises(ValueError, match="no MATES train iterator.*dataset_provider"):
        cb.on_train_start(bcb.CallbackContext(state=bridge_state(tmp_path), model=[]))
    it, valid, test = cb.provide(None)
    assert valid is None and test is None
    with pytest.raises(RuntimeError, match=r"callbacks=\[callback\]"):
        next(it)


def test_a_missing_bridge_names_the_extra(monkeypatch):
    with pytest.raises(ImportError, match=r"pip install 'mates-megatron\[bridge\]'"):
        mb.import_bridge("megatron.bridge.no_such_module")
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # Bridge installed, its CUDA dependency not
    monkeypatch.delitem(sys.modules, "megatron.bridge.peft.lora_layers", raising=False)
    with pytest.raises(ImportError, match="transformer_engine.*transformer-engine needs a CUDA machine"):
        mb.import_bridge("megatron.bridge.peft.lora_layers")

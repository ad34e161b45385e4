"""MatesCallback: the round in Megatron-Bridge's training loop, on Bridge's own callback API.

Bridge 0.3.1 (``megatron.bridge.training.callbacks``) fires ``on_train_start`` after setup (model, optimizer,
data iterators and a resumed checkpoint are in place), ``on_train_step_end`` after every ``train_step`` and
*before* it increments ``train_state.step``, and ``on_train_end`` after the loop, before ``pretrain`` saves its
final checkpoint. It has no checkpoint event: ``checkpoint_and_decide_exit`` saves right after the step end.
So at each step end the callback runs the hook for ``iteration = step + 1`` (what Megatron-LM's
``mates_step_end`` gets) and, when Bridge is about to save at that iteration, settles the hook and writes the
MATES state to ``<save>/iter_NNNNNNN/mates_state.pt`` first, as Megatron-LM's patched ``save_checkpoint`` does.

The plugin's process state, its step-end call and its state file are the Megatron-LM integration's
(``integrations.megatron_lm.state``): this module only maps Bridge's events onto them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from mates_megatron.config import SelectionConfig
from mates_megatron.integrations.megatron_bridge.host import bridge_host
from mates_megatron.integrations.megatron_bridge.imports import import_bridge
from mates_megatron.integrations.megatron_lm import state as mlm_state
from mates_megatron.integrations.megatron_lm.loader import build_mates_data_loader
from mates_megatron.probe.settings import Refusal, Spelling, core_values, probe_setting_problems

Callback = import_bridge("megatron.bridge.training.callbacks").Callback

log = logging.getLogger("mates_megatron.integrations.megatron_bridge")


class DeferredIterator:
    """An iterator Bridge's setup receives from the dataset provider and reads from the first train step on;
    the callback binds the MATES loader to it in ``on_train_start`` (the plugin needs the built model)."""

    def __init__(self, split: str) -> None:
        self.split = split
        self._it: Iterator | None = None

    def bind(self, it: Iterator) -> None:
        self._it = it

    def __iter__(self) -> DeferredIterator:
        return self

    def __next__(self):
        if self._it is None:
            raise RuntimeError(
                f"the MATES {self.split} iterator was read before MatesCallback.on_train_start: pass the same "
                "callback whose dataset_provider built config.dataset to pretrain(config, forward_step, "
                "callbacks=[callback])"
            )
        return next(self._it)


def _cycle(loader) -> Iterator | None:
    """Bridge's cyclic iteration of a validation/test loader (None: no such split)."""
    if loader is None:
        return None

    def forever():
        while True:
            yield from loader

    return forever()


# Where Bridge keeps a setting of the refusal list apart from megatron-core's field (``Refusal.core``): its own
# sections, or two fields it keeps equal (ConfigContainer.validate turns both on when either is).
_BRIDGE_FIELDS = {
    "use_torch_fsdp2": ("dist.use_torch_fsdp2",),
    "use_megatron_fsdp": ("ddp.use_megatron_fsdp", "dist.use_megatron_fsdp"),
    "te_rng_tracker": ("rng.te_rng_tracker", "model.use_te_rng_tracker"),
}
# Sections whose fields Bridge's setup copies onto model/ddp/optimizer (runtime_config_update), so that a fix
# made there alone would be overwritten.
_BRIDGE_SOURCES = ("comm_overlap", "mixed_precision")


def _bridge_get(cfg: Any, path: str) -> Any:
    section, field = path.split(".")
    return getattr(getattr(cfg, section, None), field, None)


def _bridge_fields(cfg: Any, r: Refusal) -> list[str]:
    """Every field of ``cfg`` that sets the setting ``r``, the one that holds its value first."""
    own = _BRIDGE_FIELDS.get(r.name, (r.core,) if r.core else ())
    field = own[0].split(".")[1] if own else ""
    sources = [f"{s}.{field}" for s in _BRIDGE_SOURCES if hasattr(getattr(cfg, s, None), field)]
    return sorted(own, key=lambda p: not _bridge_get(cfg, p)) + sources


def _bridge_probe_settings(cfg: Any) -> dict[str, Any]:
    """The refusal list's settings in Bridge's config (its model/ddp/optimizer are megatron-core's configs)."""
    values = core_values({s: getattr(cfg, s, None) for s in ("model", "ddp", "optimizer")})
    for name, fields in _BRIDGE_FIELDS.items():
        values[name] = any(_bridge_get(cfg, p) for p in fields)
    return values


def _bridge_spelling(cfg: Any, sel: SelectionConfig) -> Spelling:
    def setting(r: Refusal, value: Any) -> str:
        return f"{_bridge_fields(cfg, r)[0]}={value!r}"

    def fix(r: Refusal) -> str:
        return "set " + " and ".join(f"{p}={r.accepted!r}" for p in _bridge_fields(cfg, r))

    return Spelling(scorer=f"scorer {sel.scorer!r}", setting=setting, fix=fix)


def check_bridge_config(cfg: Any, selection: SelectionConfig) -> None:
    """Refuse Bridge settings under which the rounds would serve other samples than the ones selected, and the
    settings under which ``selection``'s probes on the live model would be wrong (``probe.settings``)."""
    problems = []
    if cfg.train.train_iters is None or getattr(cfg.train, "train_samples", None) is not None:
        problems.append("train.train_iters must be set (sample-based training, train.train_samples, is not "
                        "supported: rounds are counted in steps)")  # fmt: skip
    if getattr(cfg.train, "rampup_batch_size", None):
        problems.append("train.rampup_batch_size: a round is select_every x global_batch_size samples, so the "
                        "global batch size must stay fixed; drop it")  # fmt: skip
    if getattr(cfg.train, "iterations_to_skip", None):
        problems.append("train.iterations_to_skip: Bridge skips those steps without firing on_train_step_end, "
                        "so a round boundary there would never be published; drop it")  # fmt: skip
    if getattr(cfg.checkpoint, "non_persistent_save_interval", None):
        problems.append("checkpoint.non_persistent_save_interval: MATES state is saved beside persistent "
                        "checkpoints only; a resume from a non-persistent one would serve other batches; use "
                        "checkpoint.save_interval")  # fmt: skip
    if getattr(cfg.dataset, "dataloader_type", None) != "external":
        problems.append(f"dataset.dataloader_type is {getattr(cfg.dataset, 'dataloader_type', None)!r}: set "
                        "config.dataset = callback.dataset_provider(config.dataset), whose train iterator serves "
                        "the MATES selection")  # fmt: skip
    problems += probe_setting_problems(
        selection, _bridge_probe_settings(cfg), _bridge_spelling(cfg, selection)
    )
    if problems:
        raise ValueError("MatesCallback: " + "\n".join(problems))


def bridge_saves_at(state: Any, iteration: int, device: torch.device) -> bool:
    """Whether Bridge's ``checkpoint_and_decide_exit`` saves at ``iteration`` (its own tests, in its order).
    Collective when the signal handler or the duration limit is on (Bridge's checks are too)."""
    cfg = state.cfg
    if not cfg.checkpoint.save:
        return False
    if cfg.checkpoint.save_interval and iteration % cfg.checkpoint.save_interval == 0:
        return True
    if cfg.train.exit_interval and iteration % cfg.train.exit_interval == 0:
        return True
    if cfg.train.exit_signal_handler and any(state.signal_handler.signals_received()):
        return True
    if cfg.train.exit_duration_in_mins:
        done = (time.time() - state.start_time) / 60.0 > cfg.train.exit_duration_in_mins
        flag = torch.tensor([int(done)], dtype=torch.int, device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
    return False


class MatesCallback(Callback):
    """MATES data selection in ``megatron.bridge.training.pretrain``::

        mates = MatesCallback(SelectionConfig(...), reference="reference.jsonl")
        config.dataset = mates.dataset_provider(config.dataset)   # the GPTDatasetConfig of the recipe
        pretrain(config, forward_step, callbacks=[mates])

    ``tokenizer``: the pretraining tokenizer's text interface (``tok(text)["input_ids"]``, ``tok.decode``),
    needed for a reference set and for scorers that read candidate text; ``device``: where the model runs
    (default: this rank's CUDA device).
    """

    def __init__(
        self,
        selection: SelectionConfig,
        *,
        reference: str | None = None,
        tokenizer: Any = None,
        device: torch.device | None = None,
    ) -> None:
        self.selection, self.reference_path = selection, reference
        self.tokenizer, self.device = tokenizer, device
        self.train_dataset = None
        self.train_iterators: list[DeferredIterator] = []
        self.saved: list[int] = []
        """Iterations whose MATES state this callback wrote (in order)."""

    # -- data: called by MatesDatasetProvider.build_datasets inside Bridge's setup, on every rank ----------
    def dataset_provider(self, base):
        """Bridge's dataset provider serving this callback's selection; ``base``: the recipe's dataset config."""
        from mates_megatron.integrations.megatron_bridge.provider import MatesDatasetProvider

        return MatesDatasetProvider.wrap(base, self)

    def provide(self, train_ds, valid_loader=None, test_loader=None):
        """What the provider returns to Bridge (dataloader_type 'external': iterators, each wrapped by Bridge
        in a RerunDataIterator). Called once per virtual pipeline stage."""
        self.train_dataset = train_ds
        it = DeferredIterator("train")
        self.train_iterators.append(it)
        return it, _cycle(valid_loader), _cycle(test_loader)

    # -- Bridge's events ---------------------------------------------------------------------------------
    def on_train_start(self, context) -> None:
        state = context.state
        cfg, ts = state.cfg, state.train_state
        check_bridge_config(cfg, self.selection)
        if not self.train_iterators:
            raise ValueError(
                "MatesCallback: Bridge built no MATES train iterator: set config.dataset = "
                "callback.dataset_provider(config.dataset) with this same callback"
            )
        reference = None
        if self.reference_path:
            from mates_megatron.probe.reference import load_reference_set

            reference = load_reference_set(self.reference_path, self.tokenizer, cfg.model.seq_length)
        host = bridge_host(state, device=self.device, reference=reference)
        host.step(context.model, context.optimizer, context.scheduler)
        gbs = cfg.train.global_batch_size
        common = {
            "train_iters": cfg.train.train_iters,
            "global_batch_size": gbs,
            "micro_batch_size": cfg.train.micro_batch_size,
            "seq_length": cfg.model.seq_length,
            "consumed_samples": ts.consumed_train_samples,
            "dp_rank": host.groups.data_parallel_rank,
            "dp_size": host.groups.data_parallel_size,
            "num_workers": getattr(cfg.dataset, "num_workers", 0),
            "pin_memory": bool(getattr(cfg.dataset, "pin_memory", False)),
        }
        sel = self.selection
        loader, plugin = build_mates_data_loader(
            sel,
            self.train_dataset,
            tokenizer=self.tokenizer if sel.needs_text_decoding else None,
            device=host.device,
            write_files=(dist.get_rank() if dist.is_initialized() else 0) == 0,
            reference_rows=len(reference) if reference is not None else 0,
            **common,
        )
        mlm_state.set_mates_state(
            mlm_state.MatesState(sel=sel, plugin=plugin, host=host, global_batch_size=gbs)
        )
        if ts.step > 0:
            load = cfg.checkpoint.load or cfg.checkpoint.save
            path = mlm_state.load_mates_state(load, ts.step)
            log.info("loaded MATES state from %s", path)
        for i, it in enumerate(self.train_iterators):
            if i:  # one loader per virtual pipeline stage, over the same plugin
                loader, _ = build_mates_data_loader(sel, self.train_dataset, plugin=plugin, **common)
            it.bind(iter(loader))

    def on_train_step_end(self, context) -> None:
        state = context.state
        iteration = state.train_state.step + 1  # Bridge increments step after this event
        # context.loss_dict is left alone: the round reads the live model, not the losses, and reading a loss
        # on the host (float, item) would be a device sync every step.
        mlm_state.mates_step_end(iteration, context.model, context.optimizer, context.scheduler)
        if bridge_saves_at(state, iteration, mlm_state.get_mates_state().host.device):
            self._save(state.cfg.checkpoint.save, iteration)

    def on_train_end(self, context) -> None:
        state = context.state
        ck, step = state.cfg.checkpoint, state.train_state.step
        try:
            if ck.save and step != 0 and ck.save_interval != 0:  # pretrain() saves after this event
                self._save(ck.save, step)
        finally:
            mlm_state.get_mates_state().plugin.hook.close()
            mlm_state.set_mates_state(None)

    def _save(self, save_dir: str, iteration: int) -> None:
        mlm_state.save_mates_state(save_dir, iteration)  # settles the hook on every rank, then writes
        self.saved.append(iteration)

"""Megatron-Bridge integration: MATES as a Bridge training callback plus a dataset provider.

    from mates_megatron.integrations.megatron_bridge import MatesCallback
    mates = MatesCallback(selection, reference="reference.jsonl", tokenizer=text_tokenizer)
    config.dataset = mates.dataset_provider(config.dataset)
    pretrain(config, forward_step, callbacks=[mates])

- ``MatesCallback`` (``callback``) subclasses Bridge's ``megatron.bridge.training.callbacks.Callback``:
  ``on_train_start`` refuses the settings the rounds cannot serve (``check_bridge_config``; with a scorer that
  reads the live model, the list of ``mates_megatron.probe.settings`` in Bridge's field names), builds the
  plugin and the host (``host.BridgeHost``) and loads the MATES state on resume;
  ``on_train_step_end`` runs the round and, before a checkpoint Bridge is about to save, settles it and writes
  ``iter_NNNNNNN/mates_state.pt`` beside it; ``on_train_end`` writes the final state and closes the hook.
- ``MatesDatasetProvider`` (``provider``) is Bridge's dataset-provider hook (``dataloader_type='external'``):
  it builds the train split as the candidate pool and serves MatesSampler's selection from it.

Bridge is imported only when these are used; the host needs only megatron-core.
"""

from __future__ import annotations

from mates_megatron.integrations.megatron_bridge.host import BridgeHost, bridge_host
from mates_megatron.integrations.megatron_bridge.imports import EXTRA, import_bridge


def __getattr__(name: str):
    if name in ("MatesCallback", "DeferredIterator", "check_bridge_config", "bridge_saves_at"):
        from mates_megatron.integrations.megatron_bridge import callback

        return getattr(callback, name)
    if name == "MatesDatasetProvider":
        from mates_megatron.integrations.megatron_bridge import provider

        return provider.MatesDatasetProvider
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EXTRA",
    "BridgeHost",
    "DeferredIterator",
    "MatesCallback",
    "MatesDatasetProvider",
    "bridge_host",
    "bridge_saves_at",
    "check_bridge_config",
    "import_bridge",
]

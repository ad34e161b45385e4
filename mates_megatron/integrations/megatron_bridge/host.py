"""The Megatron-Bridge host: what the round reads of Bridge's live training job (``mates_megatron.host.Host``).

Bridge hands its model chunks, optimizer and scheduler to every callback in ``CallbackContext``; the rest is
fixed for the run and read once from Bridge's ``GlobalState`` when the plugin is built. The fields and the
metric logging are Megatron-LM's host exactly (both run megatron-core's model, optimizer and schedule), so
this host is that one, built from Bridge's state instead of Megatron-LM's globals.
"""

from __future__ import annotations

from typing import Any

import torch

from mates_megatron.host import ProcessGroups
from mates_megatron.integrations.megatron_lm.host import MegatronLMHost
from mates_megatron.probe.reference import ReferenceSet


class BridgeHost(MegatronLMHost):
    """``mates_megatron.host.Host`` for Megatron-Bridge (one per process, updated at every step end).

    ``tensorboard_writer`` / ``wandb_writer`` are Bridge's ``GlobalState.tensorboard_logger`` /
    ``wandb_logger`` (None on ranks that do not log)."""


def bridge_host(
    state: Any, *, device: torch.device | None = None, reference: ReferenceSet | None = None
) -> BridgeHost:
    """The host of this Bridge process, from its ``GlobalState`` (call once setup has run: in
    ``on_train_start``). ``device``: where the model runs (default: this rank's CUDA device)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg = state.cfg
    return BridgeHost(
        device=device if device is not None else torch.device("cuda", torch.cuda.current_device()),
        seq_length=cfg.model.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        groups=ProcessGroups.from_parallel_state(),
        forward_backward_func=get_forward_backward_func(),
        reference=reference,
        distributed_optimizer=bool(cfg.optimizer.use_distributed_optimizer),
        tensorboard_writer=state.tensorboard_logger,
        wandb_writer=state.wandb_logger,
    )

"""The Megatron-LM host: what the round reads of Megatron-LM's live training job (``mates_megatron.host.Host``).

Megatron-LM hands its model, optimizer and scheduler to ``mates_step_end`` after every step; the rest (process
groups, the schedule, the reference set, the loggers) is fixed for the run and set once when the plugin is
built. The round builds its probe context from this host; nothing here knows about probes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mates_megatron.host import ProcessGroups
from mates_megatron.probe.reference import ReferenceSet


@dataclass
class MegatronLMHost:
    """``mates_megatron.host.Host`` for Megatron-LM (one per process, updated at every step end)."""

    device: torch.device
    """This rank's CUDA device, or the CPU in CPU mode (the influence model runs there too unless configured
    otherwise)."""
    seq_length: int
    """--seq-length."""
    micro_batch_size: int
    """--micro-batch-size."""
    groups: ProcessGroups
    """megatron-core's process groups (``ProcessGroups.from_parallel_state()``)."""
    forward_backward_func: Callable
    """megatron-core's schedule for this model (``get_forward_backward_func()``)."""
    reference: ReferenceSet | None = None
    """The probe reference set (--mates-reference), tokenised once with Megatron-LM's tokenizer."""
    distributed_optimizer: bool = False
    """--use-distributed-optimizer."""
    model_chunks: list = field(default_factory=list)
    """Megatron-LM's model list (DDP-wrapped chunks), as last handed to ``mates_step_end``."""
    optimizer: Any = None
    """Megatron-LM's MegatronOptimizer, as last handed to ``mates_step_end``."""
    scheduler: Any = None
    """Megatron-LM's OptimizerParamScheduler, as last handed to ``mates_step_end``."""
    tensorboard_writer: Any = None
    """Megatron-LM's TensorBoard writer (``get_tensorboard_writer()``; None on ranks that do not log)."""
    wandb_writer: Any = None
    """Megatron-LM's W&B writer (``get_wandb_writer()``; None unless configured)."""

    def step(self, model, optimizer, scheduler) -> MegatronLMHost:
        """Take the live objects Megatron-LM passes at a step end (it may rebuild them, e.g. on resharding)."""
        self.model_chunks = list(model)
        self.optimizer, self.scheduler = optimizer, scheduler
        return self

    def log_metrics(self, step: int, scalars: dict[str, float]) -> None:
        if self.tensorboard_writer is not None:
            for k, v in scalars.items():
                self.tensorboard_writer.add_scalar(k, v, step)
        if self.wandb_writer is not None:
            self.wandb_writer.log(scalars, step)


def megatron_lm_host(args, *, reference_tokenizer=None) -> MegatronLMHost:
    """The host of this Megatron-LM process (reads Megatron-LM's global state: call after initialisation).

    The reference set is loaded once here, when ``args.mates_reference`` is set.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.training import get_tensorboard_writer, get_wandb_writer

    from mates_megatron.compat.cpu import is_cpu_mode

    reference = None
    if getattr(args, "mates_reference", None):
        from mates_megatron.probe.reference import load_reference_set

        reference = load_reference_set(args.mates_reference, reference_tokenizer, args.seq_length)
    return MegatronLMHost(
        # CPU mode (``mates_megatron.integrations.megatron_lm.cpu``) runs Megatron-LM on CPU over gloo.
        device=torch.device("cpu") if is_cpu_mode() else torch.device("cuda", torch.cuda.current_device()),
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        groups=ProcessGroups.from_parallel_state(),
        forward_backward_func=get_forward_backward_func(),
        reference=reference,
        distributed_optimizer=bool(args.use_distributed_optimizer),
        tensorboard_writer=get_tensorboard_writer(),
        wandb_writer=get_wandb_writer(),
    )


class MegatronTextTokenizer:
    """A Megatron-LM tokenizer with the two calls the plugin makes on a pretraining tokenizer.

    ``tok(text, add_special_tokens=False)["input_ids"]`` (reference set) is Megatron's ``tokenize`` and
    ``tok.decode(ids)`` (candidate text for the influence model) its ``detokenize``. Megatron's
    ``tokenize`` adds whatever special tokens the tokenizer adds by default (none for GPT-NeoX).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": list(self.tokenizer.tokenize(text))}

    def decode(self, ids) -> str:
        return self.tokenizer.detokenize(list(ids))

    @property
    def vocab(self) -> dict[str, int] | None:
        """Megatron's vocabulary (token -> id), for the check of ``influence.pass_token_ids``."""
        return getattr(self.tokenizer, "vocab", None)


def megatron_tokenizer(args):
    """Megatron-LM's tokenizer (built by ``initialize_megatron``, else from the arguments)."""
    from megatron.training import get_tokenizer

    try:
        return get_tokenizer()
    except AssertionError:  # not built by initialize_megatron
        from megatron.training.tokenizer import build_tokenizer

        return build_tokenizer(args)

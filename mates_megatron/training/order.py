"""What the loop trains on at each step and what it calls after each: the protocols the plugin implements
(``MatesSampler`` is a ``SampleOrder``, ``MatesHook`` a ``TrainerHook``) and Megatron's own order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mates_megatron.training.data import sequential_indices


class SampleOrder(Protocol):
    """Which dataset samples each step trains on. MatesSampler implements this."""

    def micro_batch_indices(self, consumed_samples: int) -> list[np.ndarray]:
        """This data-parallel rank's micro-batches (sample indices) of the global batch at consumed_samples."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainerHook(Protocol):
    """Called at every step end; its state is saved with the checkpoint (MatesHook implements this).

    An optional ``state_rank: int`` names the rank whose ``state_dict`` is complete (default 0); an optional
    ``settle()`` is called on every rank before ``state_dict`` (work in flight finishes first)."""

    # ``trainer`` is the loop's Trainer, left untyped so that the protocols do not import the loop.
    def on_step_end(self, trainer: Any, iteration: int, metrics: dict[str, float]) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class SequentialOrder:
    """Megatron's pretraining order (no selection): consecutive global batches of the dataset."""

    global_batch_size: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int

    def micro_batch_indices(self, consumed_samples: int) -> list[np.ndarray]:
        return sequential_indices(
            consumed_samples,
            global_batch_size=self.global_batch_size,
            micro_batch_size=self.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
        )

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

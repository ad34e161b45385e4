"""Every RNG a Megatron-Core run draws from: Python, NumPy, torch CPU/CUDA and the model-parallel tracker."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def get_host_rng_state() -> dict[str, Any]:
    """The process-wide streams (Python, NumPy, torch CPU and CUDA), without Megatron's tracker: what a side
    process (the influence worker) needs to continue a draw exactly."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_host_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def get_rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    return {**get_host_rng_state(), "tracker": {k: v.clone() for k, v in tracker.items()}}


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    set_host_rng_state(state)
    tensor_parallel.get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["tracker"].items()})

"""CPU/gloo mode for megatron-core: real megatron-core code on machines without CUDA.

megatron-core assumes CUDA in a handful of places. CPU mode redirects exactly those, and nothing else:

1. The CUDA RNG tracker (``tensor_parallel.random``) forks CUDA generator states around dropout and
   initialisation; it is replaced by a tracker with the same interface (add / fork / get_states /
   set_states / reset) over CPU generator states.
2. Tensors that megatron-core creates with ``device="cuda"`` or ``device=torch.cuda.current_device()``
   (pipeline schedules, p2p buffers, loss averaging, and ``GlobalMemoryBuffer.get_tensor``, which the
   sequence-parallel all-gathers use) are rewritten to CPU by a ``TorchFunctionMode``;
   ``torch.cuda.current_device``/``synchronize``/``empty_cache`` get CPU stand-ins. The design listed the
   memory buffer as a separate redirection; the device mode covers it (a test shows the buffer lands on
   CPU), so there is no second patch of the same allocation.
3. The optimizer checks ``param.type() == 'torch.cuda.FloatTensor'``; in CPU mode ``Tensor.type()`` with no
   argument reports the CUDA type name of a CPU tensor.

CPU mode is switched on explicitly (``enable_cpu_mode()``) and refuses to switch on where CUDA is available:
on a GPU machine megatron-core must run as it is. Each redirection can be left out by name
(``enable_cpu_mode(skip={"rng_tracker"})``) so that tests can show each one is needed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

REDIRECTIONS = ("rng_tracker", "device_mode", "tensor_type")

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.int16: "torch.cuda.ShortTensor",
    torch.int8: "torch.cuda.CharTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(device: Any) -> bool:
    # An int device means "CUDA device N" to torch factory functions.
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch function called while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """The CUDA RNG tracker's interface over CPU generator states.

    ``fork(name)`` swaps the process-wide CPU generator to the named state for the duration of the block
    and saves the advanced state on exit, as the CUDA tracker does with the CUDA generator: dropout inside
    a tensor-parallel region then draws from a per-TP-rank stream, outside it from the shared stream.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


@dataclass
class CpuMode:
    """Handle of an enabled CPU mode; ``disable()`` restores everything it replaced."""

    enabled: tuple[str, ...]
    _undo: list = field(default_factory=list, repr=False)

    def disable(self) -> None:
        global _ACTIVE
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        _ACTIVE = None


_ACTIVE: CpuMode | None = None
_LOCK = threading.Lock()


def is_cpu_mode() -> bool:
    """True while CPU mode is enabled in this process."""
    return _ACTIVE is not None


def _set_attr(undo: list, obj: Any, name: str, value: Any) -> None:
    had = name in vars(obj) if isinstance(obj, type) else hasattr(obj, name)
    old = getattr(obj, name, None)
    setattr(obj, name, value)

    def restore() -> None:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)

    undo.append(restore)


def enable_cpu_mode(skip: set[str] | frozenset[str] = frozenset()) -> CpuMode:
    """Switch megatron-core to CPU for this process. Call before building models or process groups.

    Args:
        skip: redirections to leave out (names from ``REDIRECTIONS``); for tests that prove each is needed.

    Raises:
        RuntimeError: CUDA is available (run megatron-core on the GPU as it is), or CPU mode is already on.
    """
    global _ACTIVE
    unknown = set(skip) - set(REDIRECTIONS)
    if unknown:
        raise ValueError(f"unknown CPU-mode redirections {sorted(unknown)}; choose from {REDIRECTIONS}")
    if torch.cuda.is_available():
        raise RuntimeError(
            "CPU mode refuses to switch on: CUDA is available on this machine. Run megatron-core on the GPU "
            "(drop --cpu / compat.cpu.enable_cpu_mode), or hide the GPUs with CUDA_VISIBLE_DEVICES= to "
            "force a CPU run."
        )
    with _LOCK:
        if _ACTIVE is not None:
            raise RuntimeError("CPU mode is already enabled in this process")
        undo: list = []
        enabled = tuple(r for r in REDIRECTIONS if r not in skip)

        # torch.cuda stand-ins: megatron-core asks for the current device and synchronises in many places.
        _set_attr(undo, torch.cuda, "current_device", lambda: 0)
        _set_attr(undo, torch.cuda, "synchronize", lambda *a, **k: None)
        _set_attr(undo, torch.cuda, "empty_cache", lambda: None)
        _set_attr(undo, torch.cuda, "set_device", lambda *a, **k: None)
        # The rerun state machine saves and restores the CUDA generator around every training step (Megatron-LM's
        # train_step): no CUDA generator here, an empty state (dropout draws from the CPU one, item 1).
        _set_attr(undo, torch.cuda, "get_rng_state", lambda *a, **k: torch.zeros(0, dtype=torch.uint8))
        _set_attr(undo, torch.cuda, "set_rng_state", lambda *a, **k: None)

        if "rng_tracker" in enabled:
            from megatron.core.tensor_parallel import random as mcore_random

            _set_attr(undo, mcore_random, "_CUDA_RNG_STATE_TRACKER", CpuRNGStatesTracker())
            _set_attr(undo, mcore_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
            # model_parallel_cuda_manual_seed resets the tracker and seeds the CUDA default generator;
            # on CPU the default generator is torch's own.
            # (torch.manual_seed itself calls torch.cuda.manual_seed_all, so seed the generator directly.)
            _set_attr(undo, torch.cuda, "manual_seed", lambda s: torch.default_generator.manual_seed(s))

        if "device_mode" in enabled:
            mode = _CudaToCpuMode()
            mode.__enter__()
            undo.append(lambda: mode.__exit__(None, None, None))

        if "tensor_type" in enabled:
            original_type = torch.Tensor.type

            def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
                if dtype is None and not kwargs and self.device.type == "cpu":
                    return _CUDA_TYPE_NAMES.get(self.dtype, original_type(self))
                return original_type(self, dtype, non_blocking, **kwargs)

            _set_attr(undo, torch.Tensor, "type", tensor_type)

        _ACTIVE = CpuMode(enabled=enabled, _undo=undo)
        return _ACTIVE


def model_parallel_seed(seed: int) -> None:
    """Seed every generator megatron-core uses (CPU default + tracker states), as on GPU.

    Works in CPU mode and on CUDA: it calls megatron-core's own ``model_parallel_cuda_manual_seed``.
    """
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)

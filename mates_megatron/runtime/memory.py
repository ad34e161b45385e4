"""What a model and its optimizer hold, and the extra memory a block of work takes on top (benchmarks, tests).

On a GPU the extra is read from the CUDA caching allocator's peak; on CPU from this process's resident set,
sampled every half millisecond on a side thread (torch's CPU allocator keeps no statistics). For the resident
set to follow the tensors, glibc's mmap threshold is fixed at 64 KiB in a process that measures: by default it
rises after the first large free, and later blocks then stay in the heap when freed (measured here: a round's
extra memory read 1.17x the model + optimizer state that way, 1.02x with the threshold fixed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
import time
from collections.abc import Sequence

import psutil
import torch

from mates_megatron.runtime.optimizers import megatron_optimizers


def model_and_optimizer_bytes(model_chunks: Sequence[torch.nn.Module], optimizer) -> int:
    """Bytes of the model's parameters and gradient buffers, the optimizer's main copies and its state."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for chunk in model_chunks:
        params = [b.param_data for b in getattr(chunk, "buffers", []) if b.param_data is not None]
        for buf in getattr(chunk, "buffers", []):
            add(buf.grad_data)
        for t in params:
            add(t)
        # Without the distributed optimizer DDP keeps the parameters as separate tensors (no param buffer).
        for p in chunk.parameters():
            if not any(
                t.data_ptr() <= p.data_ptr() < t.data_ptr() + t.numel() * t.element_size() for t in params
            ):
                add(p.data)
    for o in megatron_optimizers(optimizer):
        for attr in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups"):
            for group in getattr(o, attr, []) or []:
                for t in group:
                    add(t)
        inner = getattr(o, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            for v in state.values():
                if torch.is_tensor(v) and v.numel() > 1:
                    add(v)
    return total


@functools.cache
def precise_resident_set() -> None:
    """Fix glibc's mmap threshold in this process (module doc); call before the allocations to be measured."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "mallopt"):  # glibc; M_MMAP_THRESHOLD is -3
        libc.mallopt(-3, 64 * 1024)


class ExtraMemory:
    """``with ExtraMemory(device) as m: ...``; then ``m.peak_bytes`` is the block's peak above its start and
    ``m.peak_total`` the peak itself (compare blocks by ``peak_total``: what a round adds to a run is its peak
    above the training step's peak, whose activations and optimizer temporaries it reuses)."""

    def __init__(self, device: torch.device, *, interval_s: float = 5e-4) -> None:
        self.device, self.interval_s = device, interval_s
        self.peak_bytes = 0
        self.peak_total = 0

    def __enter__(self) -> ExtraMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        precise_resident_set()
        self._proc = psutil.Process()
        self._start = self._proc.memory_info().rss
        self._peak = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_total = torch.cuda.max_memory_allocated(self.device)
            self.peak_bytes = self.peak_total - self._start
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_total = self._peak
        self.peak_bytes = self._peak - self._start

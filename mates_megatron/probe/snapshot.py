"""In-memory snapshot/restore of everything one probe step touches, bit-exact.

A probe takes a real optimizer step and must leave no trace: model weights, the optimizer state (Adam moments
and step counts; fp32 main copies under mixed precision), the learning-rate scheduler and every RNG come back
bit-identical. Tensors are copied in place, so the DDP buffers that parameters view into stay the same storage.
This replaces the reference implementation's checkpoint reload per probe.

The gradient buffers are not copied: a snapshot is taken at a step boundary, where what they hold is dead (every
host, Megatron-LM's ``train_step``, Bridge's and the project's loop, zeroes them before the next backward), so
``restore`` zeroes them instead. At a 1B model that saves a full fp32 copy of the parameters per snapshot.

Memory: one snapshot holds the parameters, the main copies and the optimizer state once. Estimators keep one
snapshot per round (``live_count`` tells how many exist, for the tests that check it).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from typing import ClassVar

import torch

from mates_megatron.runtime.optimizers import megatron_optimizers
from mates_megatron.runtime.rng import get_rng_state, set_rng_state


def _inner_optimizers(optimizer) -> list:
    return [o.optimizer for o in megatron_optimizers(optimizer) if o.optimizer is not None]


def _main_params(optimizer) -> list[torch.Tensor]:
    """fp32 master copies that are not the model parameters themselves (mixed precision)."""
    out: list[torch.Tensor] = []
    for o in megatron_optimizers(optimizer):
        for attr in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups"):
            for group in getattr(o, attr, []) or []:
                out += [t for t in group if t is not None]
    return out


def _ddp_buffers(model_chunks) -> list:
    return [
        buf
        for chunk in model_chunks
        for buf in list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", []))
    ]


def _bucket_groups(model_chunks) -> list:
    return [
        g
        for chunk in model_chunks
        for g in list(getattr(chunk, "bucket_groups", []))
        + list(getattr(chunk, "expert_parallel_bucket_groups", []))
    ]


class TrainingSnapshot:
    """Capture now; ``restore()`` puts every captured tensor and state back in place (any number of times)."""

    _live: ClassVar[weakref.WeakSet] = weakref.WeakSet()

    def __init__(self, model_chunks: Sequence[torch.nn.Module], optimizer, scheduler=None) -> None:
        self.model_chunks, self.optimizer, self.scheduler = list(model_chunks), optimizer, scheduler
        buffers = _ddp_buffers(self.model_chunks)
        self._grads = [buf.grad_data for buf in buffers]
        self._tensors = self._targets(buffers)
        self._saved = [t.detach().clone() for t in self._tensors]
        self._opt_state = [
            ({p: {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in st.items()} for p, st in o.state.items()},
             [{k: v for k, v in g.items() if k != "params"} for g in o.param_groups])
            for o in _inner_optimizers(optimizer)
        ]  # fmt: skip
        # A probe never steps the scheduler; its only moving part is num_steps (lr lives in param_groups).
        self._sched_steps = scheduler.num_steps if scheduler is not None else None
        # Under the distributed optimizer with overlapped parameter gathers, whether each bucket's gather is
        # still due (DDP's forward pre-hook runs it): a probe step and its forward change it.
        self._gather_due = [
            getattr(g, "param_gather_dispatched", None) for g in _bucket_groups(self.model_chunks)
        ]
        self._rng = get_rng_state()
        TrainingSnapshot._live.add(self)

    @classmethod
    def live_count(cls) -> int:
        """Snapshots alive in this process (each holds a copy of the model and optimizer state)."""
        return len(cls._live)

    def _targets(self, buffers) -> list[torch.Tensor]:
        tensors = [buf.param_data for buf in buffers if getattr(buf, "param_data", None) is not None]
        # Parameters outside DDP buffers (no DDP wrapper, or not in a bucket) are captured one by one.
        for chunk in self.model_chunks:
            for p in chunk.parameters():
                if not any(_inside(p, b) for b in tensors):
                    tensors.append(p.data)
        seen = {t.data_ptr() for t in tensors}
        tensors += [t for t in _main_params(self.optimizer) if t.data_ptr() not in seen]
        return tensors

    def saved(self, t: torch.Tensor) -> torch.Tensor:
        """The captured value of ``t``: a captured tensor, or a contiguous view into one (a parameter in its
        DDP buffer, a distributed-optimizer shard), as the same-shaped view of the copy."""
        for live, kept in zip(self._tensors, self._saved, strict=True):
            if live.dtype == t.dtype and _inside(t, live):
                start = (t.data_ptr() - live.data_ptr()) // t.element_size()
                if start + t.numel() <= live.numel():
                    return kept.view(-1)[start : start + t.numel()].view(t.shape)
        raise KeyError("the tensor is not part of this snapshot (not a parameter, main copy or view of one)")

    @torch.no_grad()
    def restore(self) -> None:
        for t, v in zip(self._tensors, self._saved, strict=True):
            t.copy_(v)
        for g in self._grads:
            g.zero_()
        for chunk in self.model_chunks:
            for p in chunk.parameters():
                p.grad = None
        for o, (state, groups) in zip(_inner_optimizers(self.optimizer), self._opt_state, strict=True):
            for p in list(o.state):
                if p not in state:
                    del o.state[p]  # state created by the probe step (first step after init)
            for p, st in state.items():
                live = o.state[p]
                for k, v in st.items():
                    if torch.is_tensor(v) and torch.is_tensor(live.get(k)) and live[k].shape == v.shape:
                        live[k].copy_(v)
                    else:
                        live[k] = v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
                for k in [k for k in live if k not in st]:
                    del live[k]
            for g, saved in zip(o.param_groups, groups, strict=True):
                g.update(saved)
        for g, due in zip(_bucket_groups(self.model_chunks), self._gather_due, strict=True):
            if due is not None:
                g.param_gather_dispatched = due
        if self.scheduler is not None:
            self.scheduler.num_steps = self._sched_steps
        set_rng_state(self._rng)


def _inside(p: torch.Tensor, buf: torch.Tensor) -> bool:
    start, end = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
    return start <= p.data_ptr() < end

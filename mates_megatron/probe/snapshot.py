"""In-memory snapshot/restore of everything one probe step touches, bit-exact.

A probe takes a real optimizer step and must leave no trace: model weights, gradient buffers, the optimizer
state (Adam moments and step counts; fp32 main copies under mixed precision), the learning-rate scheduler
and every RNG come back bit-identical. Tensors are copied in place, so the DDP buffers that parameters view
into stay the same storage. This replaces the reference implementation's checkpoint reload per probe.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

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


def _buffers(model_chunks) -> list[torch.Tensor]:
    """DDP's contiguous param and grad buffers (params and main_grads are views into them)."""
    out = []
    for chunk in model_chunks:
        for buf in list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", [])):
            if getattr(buf, "param_data", None) is not None:
                out.append(buf.param_data)
            out.append(buf.grad_data)
    return out


class TrainingSnapshot:
    """Capture now; ``restore()`` puts every captured tensor and state back in place (any number of times)."""

    def __init__(self, model_chunks: Sequence[torch.nn.Module], optimizer, scheduler=None) -> None:
        self.model_chunks, self.optimizer, self.scheduler = list(model_chunks), optimizer, scheduler
        self._tensors = self._targets()
        self._saved = [t.detach().clone() for t in self._tensors]
        self._opt_state = [
            ({p: {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in st.items()} for p, st in o.state.items()},
             [{k: v for k, v in g.items() if k != "params"} for g in o.param_groups])
            for o in _inner_optimizers(optimizer)
        ]  # fmt: skip
        # A probe never steps the scheduler; its only moving part is num_steps (lr lives in param_groups).
        self._sched_steps = scheduler.num_steps if scheduler is not None else None
        self._rng = get_rng_state()

    def _targets(self) -> list[torch.Tensor]:
        tensors = _buffers(self.model_chunks)
        seen = {t.data_ptr() for t in tensors}
        # Parameters outside DDP buffers (no DDP wrapper, or not in a bucket) are captured one by one.
        for chunk in self.model_chunks:
            for p in chunk.parameters():
                if not any(_inside(p, b) for b in tensors):
                    tensors.append(p.data)
                    seen.add(p.data_ptr())
        tensors += [t for t in _main_params(self.optimizer) if t.data_ptr() not in seen]
        return tensors

    @torch.no_grad()
    def restore(self) -> None:
        for t, v in zip(self._tensors, self._saved, strict=True):
            t.copy_(v)
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
        if self.scheduler is not None:
            self.scheduler.num_steps = self._sched_steps
        set_rng_state(self._rng)


def _inside(p: torch.Tensor, buf: torch.Tensor) -> bool:
    start, end = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
    return start <= p.data_ptr() < end

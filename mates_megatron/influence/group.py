"""The influence model's own process groups (never one of Megatron's), and how a wait on them fails: within
``InfluenceConfig.timeout_s``, naming the phase and the ranks that did not arrive."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

_GROUPS: dict[tuple, object] = {}

DEFAULT_TIMEOUT_S = 1800.0
"""``InfluenceConfig.timeout_s``'s default (torch's own for gloo groups)."""


def influence_group(ranks: list[int] | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S):
    """A new gloo group over ``ranks`` (default: every rank) whose collectives give up after ``timeout_s``,
    cached per rank set and timeout.

    Collective: every rank of the world must call it with the same ranks (torch.distributed.new_group).
    Returns None on ranks outside the group. gloo keeps its traffic off the NCCL communicators that
    training uses, so influence work can run beside training.
    """
    world = dist.get_world_size()
    key = tuple(sorted(set(ranks))) if ranks is not None else tuple(range(world))
    if not key or key[0] < 0 or key[-1] >= world:
        raise ValueError(f"influence ranks {list(key)} must be a non-empty subset of 0..{world - 1}")
    if (key, timeout_s) not in _GROUPS:
        _GROUPS[key, timeout_s] = dist.new_group(
            ranks=list(key), backend="gloo", timeout=timedelta(seconds=timeout_s)
        )
    return _GROUPS[key, timeout_s] if dist.get_rank() in key else None


def world_group():
    """A gloo group of the whole world (``influence_group()``) when this process is one of several, None when
    alone: for work that every rank calls alike and can share out (a scorer's pass over a round)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return influence_group()


def accelerator_group(ranks: list[int] | None, device, *, timeout_s: float = DEFAULT_TIMEOUT_S):
    """The group the fit's tensor collectives run on when the influence model is on ``device``: on CUDA a new
    NCCL group over ``ranks`` (default: every rank), so the gradients are all-reduced where they are instead of
    through host memory and gloo at every step; on any other device None (the gloo ``influence_group`` does
    it). Cached like ``influence_group``; collective over the world like it (every rank calls it with the same
    ranks and device type); None on ranks outside the group."""
    if torch.device(device).type != "cuda":
        return None
    world = dist.get_world_size()
    key = tuple(sorted(set(ranks))) if ranks is not None else tuple(range(world))
    if (key, timeout_s, "nccl") not in _GROUPS:
        _GROUPS[key, timeout_s, "nccl"] = dist.new_group(
            ranks=list(key), backend="nccl", timeout=timedelta(seconds=timeout_s)
        )
    return _GROUPS[key, timeout_s, "nccl"] if dist.get_rank() in key else None


class InfluenceTimeout(RuntimeError):
    """A wait of the influence stage outlasted ``InfluenceConfig.timeout_s``; the message names the phase and
    who did not answer."""


def timeout_message(phase: str, whom: str, timeout_s: float, detail: str = "") -> str:
    """The one wording of every influence-stage timeout: the phase, who did not answer, and the fixes."""
    tail = f"\n{detail}" if detail else ""
    return (
        f"influence stage, phase '{phase}': {whom} did not answer within {timeout_s:g} s "
        f"(influence.timeout_s): look for an error or a hang in its log, or raise influence.timeout_s if "
        f"the phase is only slow{tail}"
    )


def meet(group, *, phase: str, timeout_s: float, names: Sequence[str]) -> None:
    """Every member of ``group`` reaches this point within ``timeout_s``, or InfluenceTimeout naming
    ``phase`` and the members that did not: ``names[i]`` describes the group's rank i (gloo's monitored
    barrier: its first rank waits for every other and names those missing; the others name the first).
    Collective over ``group``; a group that timed out is not usable afterwards."""
    try:
        dist.monitored_barrier(group, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as e:
        missing = _missing_ranks(str(e))
        whom = ", ".join(names[r] for r in missing if r < len(names)) or "a member of its group"
        first = str(e).strip().splitlines()[0]  # gloo appends C++ frames after the first line
        raise InfluenceTimeout(timeout_message(phase, whom, timeout_s, f"torch: {first}")) from None


def _missing_ranks(message: str) -> list[int]:
    """The group ranks that gloo's monitored barrier reports missing: its first rank lists them ('Ranks 2, 3
    failed to pass monitoredBarrier'); any other rank names the first ('... send/recv from rank 0')."""
    listed = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", message)
    if listed:
        return [int(r) for r in listed.group(1).replace(" ", "").split(",") if r]
    first = re.search(r"from rank (\d+)", message)
    return [int(first.group(1))] if first else []

"""The influence model's own process group, created once, never one of Megatron's groups."""

from __future__ import annotations

import torch.distributed as dist

_GROUPS: dict[tuple[int, ...], object] = {}


def influence_group(ranks: list[int] | None = None):
    """A new gloo group over ``ranks`` (default: every rank), cached per rank set.

    Collective: every rank of the world must call it with the same ranks (torch.distributed.new_group).
    Returns None on ranks outside the group. gloo keeps its traffic off the NCCL communicators that
    training uses, so influence work can run beside training.
    """
    world = dist.get_world_size()
    key = tuple(sorted(set(ranks))) if ranks is not None else tuple(range(world))
    if not key or key[0] < 0 or key[-1] >= world:
        raise ValueError(f"influence ranks {list(key)} must be a non-empty subset of 0..{world - 1}")
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(ranks=list(key), backend="gloo")
    return _GROUPS[key] if dist.get_rank() in key else None

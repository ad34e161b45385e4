"""megatron-core optimizers as a list, whether or not they are chained, and the tensors each one updates."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def megatron_optimizers(optimizer) -> list:
    """The optimizers inside a megatron-core ChainedOptimizer (or the optimizer itself)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _offset(view: torch.Tensor, param: torch.Tensor) -> int:
    return (view.data_ptr() - param.data_ptr()) // view.element_size()


def main_params(optimizer) -> list[tuple[torch.nn.Parameter, torch.Tensor, int]]:
    """(model parameter, the fp32 tensor the optimizer steps for it, where that tensor starts in the parameter's
    flattened values) for every parameter this rank's optimizer updates.

    What an optimizer step really changes, before any rounding to the model's dtype: with ``--bf16`` the fp32
    main copy (a bf16 parameter moves by whole bf16 ulps, which quantises a one-sample update), under the
    distributed optimizer only this rank's shard of it (offset > 0 for shards that start inside the parameter);
    in fp32 without main copies the parameter itself.
    """
    out: list[tuple[torch.nn.Parameter, torch.Tensor, int]] = []
    for o in megatron_optimizers(optimizer):
        if hasattr(o, "shard_fp32_from_float16_groups"):  # DistributedOptimizer
            for models, shards, mains in zip(
                o.model_float16_groups, o.shard_float16_groups, o.shard_fp32_from_float16_groups, strict=True
            ):
                # shards[i] is a view of the bf16 parameter: it tells where the fp32 shard starts.
                out += [(p, m, _offset(s, p)) for p, s, m in zip(models, shards, mains, strict=True)]
            for models, shards in zip(o.model_fp32_groups, o.shard_fp32_groups, strict=True):
                out += [(p, s, _offset(s, p)) for p, s in zip(models, shards, strict=True)]
        elif hasattr(o, "fp32_from_float16_groups"):  # Float16OptimizerWithFloat16Params
            for models, mains in zip(o.float16_groups, o.fp32_from_float16_groups, strict=True):
                out += [(p, m, 0) for p, m in zip(models, mains, strict=True)]
            out += [(p, p, 0) for group in o.fp32_from_fp32_groups for p in group]
        else:  # FP32Optimizer: the model's own parameters
            out += [(p, p, 0) for g in o.optimizer.param_groups for p in g["params"]]
    return out


def allocate_torch_adam_state(optimizer) -> None:
    """Give a distributed optimizer that has not stepped yet an (all-zero) torch Adam state to load into.

    Without apex/TE (CPU mode always), megatron-core's DistributedOptimizer wraps torch Adam, and its
    ``state_dict()`` reads the common "step" from torch Adam's per-parameter state and asserts there is exactly
    one value (distrib_optimizer.py, ``assert len(steps) == 1``, 0.16.1 and 0.19.0); a freshly built optimizer
    has no state yet, and ``sharded_state_dict(is_loading=True)`` calls ``state_dict()`` before it allocates
    any. The zeros are overwritten by the load. Used by the project's loop and the Megatron-LM CPU launcher.
    """
    from megatron.core.optimizer import distrib_optimizer

    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        return
    for o in megatron_optimizers(optimizer):
        if not isinstance(o, distrib_optimizer.DistributedOptimizer) or len(o.optimizer.state):
            continue
        o.init_state_fn(o.optimizer, o.config)
        for group in o.optimizer.param_groups:
            for p in group["params"]:
                o.optimizer.state[p].setdefault("step", torch.zeros((), dtype=torch.float32))


@dataclass
class AdamTerms:
    """What one step of a megatron-core Adam will do to one main tensor, read without stepping.

    ``exp_avg``/``exp_avg_sq`` are the live moments (views, not copies); ``step`` counts the steps taken so far
    (the next step is ``step + 1``); ``lr`` and ``weight_decay`` are the values the scheduler has set for the
    next step; ``decoupled`` is AdamW's weight decay (megatron-core's default), else Adam's L2 term.
    """

    param: torch.nn.Parameter
    main: torch.Tensor
    offset: int
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool


def adam_terms(optimizer) -> list[AdamTerms]:
    """``AdamTerms`` for every main tensor of ``main_params(optimizer)``, from the inner optimizer's state.

    torch's Adam/AdamW (CPU mode, or no TE/apex) keeps the step per tensor in ``state["step"]``; TE's and
    apex's FusedAdam keep it per group in ``group["step"]`` and AdamW mode in ``adam_w_mode``. A tensor with no
    state yet (before the first step, when Adam's first update is a sign step, not a preconditioned gradient)
    raises: nothing reads a direction the optimizer does not have.
    """
    where: dict[int, tuple[object, dict]] = {}
    for o in megatron_optimizers(optimizer):
        inner = o.optimizer
        for group in inner.param_groups:
            for t in group["params"]:
                where[id(t)] = (inner, group)
    out = []
    for p, main, offset in main_params(optimizer):
        inner, group = where[id(main)]
        state = inner.state.get(main, {})
        if "exp_avg_sq" not in state:
            raise RuntimeError(
                "the optimizer has no Adam state yet (no step taken): probe after at least one training step "
                "(selection.warmup_steps >= select_every)"
            )
        step = state.get("step", group.get("step"))
        decoupled = bool(group.get("decoupled_weight_decay", getattr(inner, "adam_w_mode", True)))
        if isinstance(inner, torch.optim.AdamW):
            decoupled = True
        beta1, beta2 = group["betas"]
        out.append(
            AdamTerms(
                p, main, offset, state["exp_avg"], state["exp_avg_sq"], int(step), float(group["lr"]),
                float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]), decoupled,
            )
        )  # fmt: skip
    return out

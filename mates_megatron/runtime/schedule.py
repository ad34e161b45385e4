"""One training or evaluation step through megatron-core's pipeline schedules.

Batches are dicts of [micro_batch, seq] tensors: tokens, labels, loss_mask (float), position_ids. Only the
first pipeline stage reads tokens/position_ids and only the last reads labels/loss_mask, but every stage
gets the same dicts, so data loading needs no per-stage logic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.rerun_state_machine import get_rerun_state_machine

Batch = dict[str, torch.Tensor]


def collate(samples: list[dict]) -> Batch:
    """Stack samples (dicts of [seq] arrays) into one micro-batch."""
    return {
        k: torch.stack([torch.as_tensor(s[k]) for s in samples])
        for k in ("tokens", "labels", "loss_mask", "position_ids")
    }


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron's 3-tuple loss contract: (summed masked loss, token count, reporting tensor).

    Accumulated in fp32: reference losses differ across probes by ~1e-3 nats.
    """
    losses = output_tensor.float()
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(losses.reshape(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.detach().float()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def run_schedule(
    model_chunks: Sequence[torch.nn.Module],
    micro_batches: Sequence[Batch],
    *,
    seq_length: int,
    forward_only: bool,
    device: torch.device,
    forward_backward_func: Callable | None = None,
) -> torch.Tensor:
    """Forward (and backward) over micro-batches; returns [loss_sum, tokens] summed over micro-batches.

    The sums are this data-parallel rank's and live on the last pipeline stage (zeros elsewhere).
    ``forward_backward_func``: the host's megatron-core schedule (default ``get_forward_backward_func()``).
    """
    losses = _schedule(
        model_chunks,
        micro_batches,
        forward_step,
        seq_length=seq_length,
        forward_only=forward_only,
        device=device,
        forward_backward_func=forward_backward_func,
    )
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for item in losses:
        total += item["lm loss"].to(torch.float64)
    return total


def _weighted_loss_func(loss_mask: torch.Tensor, weight: torch.Tensor, output_tensor: torch.Tensor):
    loss_sum, num_tokens, report = loss_func(loss_mask, output_tensor)
    return loss_sum * weight.reshape(()), num_tokens, report


def _weighted_forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_weighted_loss_func, batch["loss_mask"], batch["loss_weight"])


def token_mean_backward(
    model_chunks: Sequence[torch.nn.Module],
    micro_batches: Sequence[Batch],
    *,
    seq_length: int,
    device: torch.device,
    forward_backward_func: Callable | None = None,
) -> torch.Tensor:
    """Backward of the mean loss per counted token over all ``micro_batches``, in one schedule call (gradients
    accumulate in DDP's buffers); returns [loss_sum, tokens] as ``run_schedule`` does.

    megatron-core gives each micro-batch the same weight (its token mean over the number of micro-batches); each
    micro-batch's loss is weighted here by its share of the set's tokens times that number, so the gradient is
    the set's token mean whatever the micro-batches hold (padding rows count no token).
    """
    tokens = [float(b["loss_mask"].sum()) for b in micro_batches]
    total_tokens = sum(tokens)
    if total_tokens <= 0:
        raise ValueError("no loss tokens in the micro-batches (every loss_mask is zero)")
    n = len(micro_batches)
    weighted = [
        {**b, "loss_weight": torch.tensor(t / total_tokens * n)}
        for b, t in zip(micro_batches, tokens, strict=True)
    ]
    losses = _schedule(
        model_chunks,
        weighted,
        _weighted_forward_step,
        seq_length=seq_length,
        forward_only=False,
        device=device,
        forward_backward_func=forward_backward_func,
    )
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for item in losses:
        total += item["lm loss"].to(torch.float64)
    return total


def _schedule(
    model_chunks,
    micro_batches,
    forward_step_func,
    *,
    seq_length,
    forward_only,
    device,
    forward_backward_func=None,
) -> list:
    """megatron-core's forward/backward schedule (pipelined when PP > 1); the last stage's loss outputs."""
    batches = [_to_device(b, device) for b in micro_batches]
    return (forward_backward_func or get_forward_backward_func())(
        forward_step_func=forward_step_func,
        data_iterator=iter(batches),
        model=list(model_chunks),
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=batches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )


def reduce_loss(total: torch.Tensor) -> float:
    """Mean loss per token over all data-parallel ranks, known on every rank (from the last stage)."""
    total = total.clone()
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    # The sums live on the last pipeline stage; the other stages hold zeros.
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    if total[1] <= 0:
        raise ValueError("no loss tokens in the batch (every loss_mask is zero)")
    return float(total[0] / total[1])


def train_step(
    model_chunks: Sequence[torch.nn.Module],
    optimizer,
    scheduler,
    micro_batches: Sequence[Batch],
    *,
    seq_length: int,
    global_batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches; returns loss, grad norm, learning rate.

    The forward-backward runs inside Megatron's rerun state machine, as Megatron-LM's ``train_step`` does: in
    ``validate_results`` mode a gradient that fails the NaN check reruns the step to tell a transient fault
    from a reproducible one, and the machine's verdict stops the run.
    """
    machine = get_rerun_state_machine()
    while machine.should_run_forward_backward(None):
        for chunk in model_chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        total = run_schedule(
            model_chunks, micro_batches, seq_length=seq_length, forward_only=False, device=device
        )
    _, should_exit, exit_code = machine.should_checkpoint_and_exit()
    if should_exit:
        raise FloatingPointError(
            f"the rerun state machine stops the run (exit code {exit_code}): a gradient failed its NaN/Inf "
            "check and the rerun told whether it was a transient fault or in the data; see its log above"
        )
    update_ok, grad_norm, _ = optimizer.step()
    if update_ok:
        scheduler.step(increment=global_batch_size)
    return {
        "loss": reduce_loss(total),
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": optimizer.param_groups[0]["lr"],
        "skipped": not update_ok,
    }


@contextlib.contextmanager
def eval_mode(model_chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """No dropout for the duration (reference losses are compared at the 1e-3 nat level)."""
    for chunk in model_chunks:
        chunk.eval()
    try:
        yield
    finally:
        for chunk in model_chunks:
            chunk.train()


@torch.no_grad()
def evaluate(
    model_chunks: Sequence[torch.nn.Module],
    micro_batches: Iterable[Batch],
    *,
    seq_length: int,
    device: torch.device,
    over_data_parallel: bool = True,
    forward_backward_func: Callable | None = None,
) -> float:
    """Mean loss per counted token over the micro-batches, known on every pipeline stage.

    With ``over_data_parallel`` the sums of all data-parallel ranks are combined (each holds a share of
    the set); without, the loss is this replica's own (a probe that changed only this replica's model).
    """
    with eval_mode(model_chunks):
        total = run_schedule(
            model_chunks,
            list(micro_batches),
            seq_length=seq_length,
            forward_only=True,
            device=device,
            forward_backward_func=forward_backward_func,
        )
    if over_data_parallel:
        return reduce_loss(total)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return float(total[0] / total[1])


def _per_sample_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float() * loss_mask.float()
    sums = losses.sum(dim=1).detach().double()
    counts = loss_mask.float().sum(dim=1).double()
    total = losses.sum()
    return total, loss_mask.sum().to(torch.int), {"per_sample": torch.stack([sums, counts], dim=1)}


def _per_sample_forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_per_sample_loss_func, batch["loss_mask"])


@torch.no_grad()
def per_sample_losses(
    model_chunks: Sequence[torch.nn.Module],
    micro_batches: Sequence[Batch],
    *,
    seq_length: int,
    device: torch.device,
    forward_backward_func: Callable | None = None,
) -> torch.Tensor:
    """Mean loss of every sample (over its counted tokens), several samples per forward pass.

    Returned on every pipeline stage of this data-parallel replica (no reduction over DP).
    """
    with eval_mode(model_chunks):
        out = _schedule(
            model_chunks,
            micro_batches,
            _per_sample_forward_step,
            seq_length=seq_length,
            forward_only=True,
            device=device,
            forward_backward_func=forward_backward_func,
        )
    n = sum(b["tokens"].shape[0] for b in micro_batches)
    stats = (
        torch.cat([o["per_sample"] for o in out])
        if out
        else torch.zeros(n, 2, dtype=torch.float64, device=device)
    )
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(stats, group=parallel_state.get_pipeline_model_parallel_group())
    return stats[:, 0] / stats[:, 1].clamp(min=1)

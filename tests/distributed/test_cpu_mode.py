"""CPU mode runs real megatron-core with TP, PP and DP over gloo, and gives the TP=1/PP=1 numbers.

Each test spawns real processes (torch.distributed, gloo); the reference is a single-process TP=1 model
with the same weights and data.
"""

from __future__ import annotations

import pytest
import torch

from mates_megatron.compat.spawn import run_on_ranks

pytestmark = pytest.mark.distributed

VOCAB, SEQ, LAYERS = 1000, 32, 2


def _model_cfg():
    from mates_megatron.training.model import GPTConfig

    return GPTConfig(
        num_layers=LAYERS, hidden_size=64, num_attention_heads=4, seq_length=SEQ, vocab_size=VOCAB
    )


def _batches(n: int, mbs: int, seed: int = 0):
    from mates_megatron.probe.reference import make_batch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randint(0, VOCAB, (mbs, SEQ + 1), generator=g).numpy()
        out.append(make_batch(t, torch.ones(mbs, SEQ).numpy()))
    return out


def _setup(tp: int = 1, pp: int = 1, skip=frozenset()):
    from mates_megatron.compat.cpu import enable_cpu_mode
    from mates_megatron.training.model import build_gpt_model
    from mates_megatron.training.parallel import ParallelConfig, initialize_parallel

    enable_cpu_mode(skip=skip)
    initialize_parallel(
        ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, cpu=True), seed=7
    )
    return build_gpt_model(_model_cfg(), cpu=True)


def _full_weights_and_grads():
    """TP=1 reference: the full weights, the loss of one batch and its gradients."""
    model = _setup()
    batch = _batches(1, 2)[0]
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    loss = out.float().mean()
    loss.backward()
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads = {k: v.grad.clone() for k, v in model.named_parameters()}
    return weights, loss.item(), grads


def _tp_loss_and_grads(weights):
    from mates_megatron.training.sharding import gather_tp, load_full_state

    model = _setup(tp=2)
    load_full_state(model, weights)
    batch = _batches(1, 2)[0]
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    loss = out.float().mean()
    loss.backward()
    grads = gather_tp(model, {k: v.grad for k, v in model.named_parameters()})
    return loss.item(), grads


def test_tp2_forward_backward_equals_tp1():
    [(weights, ref_loss, ref_grads)] = run_on_ranks(_full_weights_and_grads, 1)
    results = run_on_ranks(_tp_loss_and_grads, 2, weights)
    for loss, grads in results:
        torch.testing.assert_close(torch.tensor(loss), torch.tensor(ref_loss), rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def _pp_losses(weights, pp: int):
    """Two optimizer steps through the real pipeline schedule; the losses of both (second = after update)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from mates_megatron.runtime.schedule import run_schedule
    from mates_megatron.training.sharding import load_full_state

    model = _setup(pp=pp)
    load_full_state(model, weights)
    ddp = DistributedDataParallel(
        config=model.config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True), module=model
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0), [ddp])
    losses = []
    for step in range(2):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        total = run_schedule(
            [ddp], _batches(4, 2, seed=step), seq_length=SEQ, forward_only=False, device=torch.device("cpu")
        )
        opt.step()
        losses.append(float(total[0] / total[1]) if parallel_state.is_pipeline_last_stage() else None)
    return losses


def test_pp2_pipeline_schedule_equals_pp1():
    [(weights, _, _)] = run_on_ranks(_full_weights_and_grads, 1)
    [ref] = run_on_ranks(_pp_losses, 1, weights, 1)
    first, last = run_on_ranks(_pp_losses, 2, weights, 2)
    assert first == [None, None]
    # The second step's loss depends on the first update: it checks the gradients of both stages,
    # including the tied embedding/output weights that the pipeline all-reduces.
    torch.testing.assert_close(torch.tensor(last), torch.tensor(ref), rtol=1e-5, atol=1e-6)
    assert ref[1] != ref[0]


def _dp_grads(weights):
    """DDP over 2 ranks, each on its own batch; returns the reduced grads and each batch's local grads."""
    import torch.distributed as dist
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from mates_megatron.runtime.schedule import run_schedule
    from mates_megatron.training.sharding import load_full_state

    model = _setup()
    load_full_state(model, weights)
    batches = _batches(2, 2, seed=11)
    # Each batch's own gradient by plain autograd, before DDP wraps the model.
    local = []
    for b in batches:
        model.zero_grad(set_to_none=True)
        out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        (out.float().sum() / out.numel()).backward()
        local.append({k: p.grad.clone() for k, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    ddp = DistributedDataParallel(
        config=model.config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True), module=model
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    ddp.zero_grad_buffer()
    run_schedule(
        [ddp], [batches[dist.get_rank()]], seq_length=SEQ, forward_only=False, device=torch.device("cpu")
    )
    reduced = {k: p.main_grad.clone() for k, p in model.named_parameters()}
    return reduced, local


def test_dp2_gradients_are_averaged():
    [(weights, _, _)] = run_on_ranks(_full_weights_and_grads, 1)
    (red0, local0), (red1, local1) = run_on_ranks(_dp_grads, 2, weights)
    for k in red0:
        expected = (local0[0][k] + local0[1][k]) / 2
        torch.testing.assert_close(red0[k], expected, rtol=1e-4, atol=1e-7, msg=k)
        torch.testing.assert_close(red1[k], red0[k], rtol=0, atol=0, msg=k)
    # The two ranks' batches differ, so the average is not either rank's own gradient.
    assert any(not torch.allclose(local0[0][k], local0[1][k]) for k in red0)


def _optimizer_step(skip: tuple[str, ...], tp: int, pp: int) -> float:
    """A full DDP + Adam step through the pipeline schedule; returns the loss seen on the last stage."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from mates_megatron.runtime.schedule import run_schedule

    model = _setup(tp=tp, pp=pp, skip=frozenset(skip))
    ddp = DistributedDataParallel(
        config=model.config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True), module=model
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0), [ddp])
    total = run_schedule(
        [ddp], _batches(2, 2), seq_length=SEQ, forward_only=False, device=torch.device("cpu")
    )
    opt.step()
    return float(total[0])


# Leaving out one redirection breaks megatron-core at the place the module docstring names.
@pytest.mark.parametrize(
    "skip, tp, pp, error",
    [
        ("rng_tracker", 2, 1, "Torch not compiled with CUDA enabled"),
        ("device_mode", 2, 1, "Cannot access accelerator device when none is available"),
        ("device_mode", 1, 2, "Torch not compiled with CUDA enabled"),
        ("tensor_type", 2, 1, "AssertionError"),
    ],
)
def test_each_redirection_is_needed(skip, tp, pp, error):
    with pytest.raises(RuntimeError, match=error):
        run_on_ranks(_optimizer_step, 2, (skip,), tp, pp)


def _memory_buffer_device() -> str:
    from megatron.core import parallel_state

    _setup(tp=1)
    buf = parallel_state.get_global_memory_buffer().get_tensor((4, 8), torch.float32, "mpu")
    return str(buf.device)


def test_global_memory_buffer_allocates_on_cpu():
    assert run_on_ranks(_memory_buffer_device, 1) == ["cpu"]


def test_cpu_mode_refuses_when_cuda_is_available(monkeypatch):
    from mates_megatron.compat import cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA is available on this machine.*CUDA_VISIBLE_DEVICES"):
        cpu.enable_cpu_mode()
    assert not cpu.is_cpu_mode()


def test_unknown_redirection_is_rejected():
    from mates_megatron.compat import cpu

    with pytest.raises(ValueError, match="unknown CPU-mode redirections"):
        cpu.enable_cpu_mode(skip={"memory_buffer"})


def _layer_settings(transformer_impl):
    from mates_megatron.training.model import GPTConfig
    from mates_megatron.training.parallel import ParallelConfig, initialize_parallel

    initialize_parallel(ParallelConfig(tensor_model_parallel_size=2, cpu=True), seed=1)
    names = ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion",
             "gradient_accumulation_fusion", "sequence_parallel")  # fmt: skip
    cfg = GPTConfig(num_layers=2, hidden_size=32, num_attention_heads=4, transformer_impl=transformer_impl)
    return {cpu: {n: getattr(cfg.transformer_config(cpu=cpu), n) for n in names} for cpu in (True, False)}


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_cpu_mode_choices_apply_in_cpu_mode_only(impl):
    """The project's loop on a GPU takes the GPU's fusions and sequence parallelism (TP=2); CPU mode runs plain
    ops without them. (The GPU-side config is built here without a GPU: only its fields are read.)"""
    cpu, gpu = run_on_ranks(_layer_settings, 2, impl)[0].values()
    assert not any(cpu.values())
    te = impl == "transformer_engine"
    assert gpu == {"bias_activation_fusion": True, "bias_dropout_fusion": True, "masked_softmax_fusion": te,
                   "gradient_accumulation_fusion": te, "sequence_parallel": True}  # fmt: skip
